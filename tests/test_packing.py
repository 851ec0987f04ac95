"""Packed rows (mm_llama.packing): the loss and every gradient equal the padded batch's, for
images and videos, with and without a shared prefix; the layout, masks and cost rule."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adapters import GatedCrossAttention
from mm_llama.config import LlamaConfig
from mm_llama.model import BF16_CPU_PACK_MULTIPLE, labeled_cross_entropy
from mm_llama.packing import PackedRows, packing_pays
from mm_llama.video_adapter import VideoConfig
from tests.test_model import VOCAB, tiny_model


def ragged_batch(model, lengths=(14, 9, 11), prefix=4, image_at=5, answer=3):
    """Right-padded rows of the given lengths: a shared ``prefix``, a media token at
    ``image_at``, the last ``answer`` tokens of each row labelled, padding after."""
    b, s = len(lengths), max(lengths)
    ids = torch.randint(0, VOCAB, (b, s))
    ids[:, :prefix] = ids[0, :prefix]
    ids[:, image_at] = model.media_token_id("image")
    labels = torch.full_like(ids, -100)
    for r, n in enumerate(lengths):
        labels[r, n - answer : n] = ids[r, n - answer : n]
        ids[r, n:] = 0  # padding: any id, never labelled
    return ids, labels


def loss_and_grads(model, ids, labels, *, pack: bool, share_prefix: bool = True, **media):
    model.zero_grad(set_to_none=True)
    loss = model.loss(ids, labels, share_prefix=share_prefix, pack=pack, **media)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, atol=1e-5):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert torch.allclose(loss_a, loss_b, atol=atol), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=atol), name


@pytest.mark.parametrize("share_prefix", [True, False])
def test_packed_loss_and_gradients_equal_the_padded_batch(share_prefix):
    model = tiny_model(gate_init=0.5)
    ids, labels = ragged_batch(model)
    images = torch.randn(3, 3, 16, 16)
    rows = PackedRows.from_labels(labels[:, 4 if share_prefix else 0 :])
    assert packing_pays(model.lm.cfg, rows, past=4 if share_prefix else 0)  # so the packed path really runs
    packed = loss_and_grads(model, ids, labels, pack=True, share_prefix=share_prefix, images=images)
    padded = loss_and_grads(model, ids, labels, pack=False, share_prefix=share_prefix, images=images)
    assert_same(packed, padded)
    # the padded path is the plain forward: no prefix sharing, no packing
    hidden = model.hidden_states(ids, model.media_context(images))
    assert torch.allclose(labeled_cross_entropy(hidden, labels, model.lm.output_weight), padded[0], atol=1e-6)
    assert all(p.grad is None for p in model.lm.parameters())


def test_rows_padded_to_a_multiple_give_the_same_loss_and_gradients(monkeypatch):
    model = tiny_model(gate_init=0.5)
    ids, labels = ragged_batch(model)  # 3 rows of 14, 9, 11 columns: 34 kept, 8 spare
    rows = PackedRows.from_labels(labels, multiple=16)
    assert rows.tokens == 42  # 48 wanted, but only the batch's 8 dropped columns can be added
    assert PackedRows.from_labels(labels, multiple=4).tokens == 36
    assert PackedRows.from_labels(labels, multiple=17).tokens == 34  # already a multiple
    images = torch.randn(3, 3, 16, 16)
    padded = loss_and_grads(model, ids, labels, pack=False, images=images)
    cpu = torch.device("cpu")
    assert model._pack_multiple(cpu) == 1  # fp32 on a CPU: exact lengths
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model._pack_multiple(cpu) == BF16_CPU_PACK_MULTIPLE
    # the padded-length path in fp32 arithmetic (22 tokens after the shared prefix, padded to 24)
    monkeypatch.setattr(type(model), "_pack_multiple", lambda self, device: 4)
    assert_same(loss_and_grads(model, ids, labels, pack=True, images=images), padded)


def test_packed_loss_equals_the_padded_batch_for_videos_with_missing_frames():
    video = VideoConfig(frames=6, frames_per_group=4, depth=1, heads=2, every=1, gate_init=0.5)
    model = tiny_model(gate_init=0.5)
    model = type(model)(model.lm, dataclasses.replace(model.cfg, video=video))
    ids, labels = ragged_batch(model)
    ids[:, 5] = model.media_token_id("video")
    media = {"videos": torch.randn(3, 6, 3, 16, 16),
             "frame_mask": torch.tensor([[True] * 6, [True] * 2 + [False] * 4, [True] * 5 + [False]])}
    assert_same(loss_and_grads(model, ids, labels, pack=True, **media),
                loss_and_grads(model, ids, labels, pack=False, **media))


def test_layout_positions_labels_and_masks():
    labels = torch.full((3, 6), -100)
    labels[0, 2:4] = 7  # length 4
    labels[1, 5] = 7  # length 6
    # row 2: no label, dropped
    rows = PackedRows.from_labels(labels)
    assert rows.tokens == 10
    assert rows.row.tolist() == [0] * 4 + [1] * 6
    assert rows.positions(offset=3).tolist() == [[3, 4, 5, 6, 3, 4, 5, 6, 7, 8]]
    packed_labels = rows.labels(labels)
    assert packed_labels.tolist() == [[-100, -100, 7, 7, -100, -100, -100, -100, -100, 7]]
    mask = rows.attention_mask(past=2)[0, 0]  # [10, 12]
    assert mask.shape == (10, 12) and mask[:, :2].all()
    assert mask[5, 2:].tolist() == [False] * 4 + [True, True] + [False] * 4  # row 1's 2nd token: row 1 up to itself
    assert mask[3, 2:].tolist() == [True] * 4 + [False] * 6
    media_mask = rows.media_mask(torch.tensor([[True, False], [True, True], [True, True]]))[0]  # [10, 6]
    assert media_mask[0].tolist() == [True, False, False, False, False, False]
    assert media_mask[9].tolist() == [False, False, True, True, False, False]
    k = torch.arange(3 * 2 * 2 * 1.0).view(3, 2, 2, 1)  # [b, h_kv, s_e, h_d]
    pk, _ = rows.media_kv((k, k))
    assert pk.shape == (1, 2, 6, 1) and pk[0, 1, 2:4, 0].tolist() == k[1, 1, :, 0].tolist()


def test_packing_pays_for_padding_not_for_long_packed_rows():
    cfg = LlamaConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536)

    def rows(b, s, length):
        labels = torch.full((b, s), -100)
        labels[:, length - 1] = 1
        return PackedRows.from_labels(labels)

    assert packing_pays(cfg, rows(8, 29, 20))  # the built-in data's stage-2 batch: a third is padding
    assert not packing_pays(cfg, rows(8, 29, 29))  # no padding: nothing to gain
    assert not packing_pays(cfg, rows(64, 256, 200))  # 12,800 packed keys a token cost more than 56 pad columns save


def test_models_with_mllama_row_masking_keep_the_padded_path():
    model = tiny_model(gate_init=0.5, row_mask_mode="mlp_only")
    assert not model._packable
    assert tiny_model()._packable
    assert any(isinstance(m, GatedCrossAttention) for m in model.modules())
