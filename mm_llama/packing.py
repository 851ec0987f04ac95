"""Row packing: a right-padded training batch run as one row, without its padding.

A batch of chat examples is padded to its longest row; on this project's built-in data a
quarter of a stage-2 batch's columns are padding, and the frozen LM computes all of them.
:class:`PackedRows` lays the rows end to end in a single row of ``n`` tokens instead, keeping
each token's RoPE position, letting each token attend only to its own row (a block-diagonal
causal mask) and only to its own sample's media. The loss is the padded batch's up to float
rounding (``tests/test_packing.py``); only the work changes.

Each row is cut after its last labelled column: later columns cannot change the loss of a
causal model. Dense block-diagonal attention costs ``n`` keys per token instead of ``s``, so
:func:`packing_pays` packs only when the columns saved outweigh that (on a GPU with large
batches it usually does not, and the padded path runs).

Shape legend: ``b`` rows, ``s`` columns, ``n`` packed tokens, ``s_e`` media tokens per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mm_llama.config import LlamaConfig


@dataclass(frozen=True)
class PackedRows:
    """Where each token of a padded ``[b, s]`` batch goes in the packed ``[1, n]`` row.

    Attributes:
        batch: ``b``. columns: ``s``.
        row: ``[n]`` long, the row each packed token comes from.
        column: ``[n]`` long, its column in that row.
    """

    batch: int
    columns: int
    row: torch.Tensor
    column: torch.Tensor

    @classmethod
    def from_labels(cls, labels: torch.Tensor, multiple: int = 1) -> PackedRows:
        """Keep each row of ``labels [b, s]`` (-100 = none) up to its last labelled column.

        ``multiple > 1`` rounds ``n`` up to a multiple of it (as far as the batch's dropped columns
        allow) with dropped, unlabelled columns appended after every kept token: a causal model's
        loss is unchanged, and the packed row takes one of few lengths. (bf16 matmuls on a CPU keep
        memory per distinct shape: benchmarks/RESULTS.md, "Image runs", stop 18.)
        """
        b, s = labels.shape
        cols = torch.arange(s, device=labels.device)
        lengths = torch.where(labels != -100, cols + 1, 0).amax(dim=1)  # [b]
        keep = cols[None, :] < lengths[:, None]  # [b, s]
        row, column = keep.nonzero(as_tuple=True)  # row-major: rows stay in order, end to end
        extra = -len(row) % multiple
        if extra:
            spare_row, spare_column = (~keep).nonzero(as_tuple=True)
            row, column = torch.cat([row, spare_row[:extra]]), torch.cat([column, spare_column[:extra]])
        return cls(b, s, row, column)

    @property
    def tokens(self) -> int:
        """``n``, the packed row's length."""
        return int(self.row.numel())

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``x [b, s, ...]`` → ``[1, n, ...]``."""
        return x[self.row, self.column][None]

    def labels(self, labels: torch.Tensor) -> torch.Tensor:
        """``labels [b, s]`` → ``[1, n]`` with each row's first column unlabelled: in the
        packed row it would be predicted by the previous row's last token."""
        packed = self.pack(labels).clone()
        packed[0, self.column == 0] = -100
        return packed

    def positions(self, offset: int = 0) -> torch.Tensor:
        """``[1, n]`` RoPE positions: each token's column, after ``offset`` shared columns."""
        return (self.column + offset)[None]

    def attention_mask(self, past: int = 0) -> torch.Tensor:
        """Bool ``[1, 1, n, past + n]``: every token sees the ``past`` shared columns, then
        the tokens of its own row up to itself."""
        n = self.tokens
        same_row = self.row[:, None] == self.row[None, :]  # [n, n]
        causal = torch.ones(n, n, dtype=torch.bool, device=self.row.device).tril()
        shared = torch.ones(n, past, dtype=torch.bool, device=self.row.device)
        return torch.cat([shared, same_row & causal], dim=1)[None, None]

    def media_kv(self, kv: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each of ``kv``, ``[b, h_kv, s_e, h_d]`` → ``[1, h_kv, b * s_e, h_d]`` (all rows' media)."""
        return tuple(t.transpose(0, 1).flatten(1, 2)[None] for t in kv)  # type: ignore[return-value]

    def media_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """``mask [b, s_e]`` (True = real media token) → ``[1, n, b * s_e]``: each packed token
        sees its own row's real media tokens only."""
        s_e = mask.shape[1]
        owner = torch.arange(self.batch, device=mask.device).repeat_interleave(s_e)  # [b * s_e]
        return ((self.row[:, None] == owner[None, :]) & mask.flatten()[None, :])[None]


def packing_pays(cfg: LlamaConfig, rows: PackedRows, past: int = 0, margin: float = 0.9) -> bool:
    """Whether the packed row costs less than ``margin`` times the padded batch.

    Per layer, a token costs its projections and MLP (``L`` FLOPs) plus ``A`` FLOPs per key it
    attends to; the padded batch attends over ``past + s`` keys, the packed row over ``past + n``
    (a dense mask computes every pair). Compares ``n (L + A (past + n))`` with ``b s (L + A (past + s))``.
    """
    h, h_kv, h_d = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
    per_token = 2 * (cfg.dim * (h + 2 * h_kv) * h_d + h * h_d * cfg.dim + 3 * cfg.dim * cfg.hidden_dim)
    per_key = 4 * h * h_d
    n, b, s = rows.tokens, rows.batch, rows.columns
    packed = n * (per_token + per_key * (past + n))
    padded = b * s * (per_token + per_key * (past + s))
    return n > 0 and packed < margin * padded
