"""Scaling out: FSDP sharding of a large frozen LM, and ``torch.compile`` of its blocks.

DDP needs nothing from here (``trainer.strategy: ddp``). A Llama 3.1 70B LM does not fit one
GPU even in bf16 (141 GB), so it is sharded with FSDP; :class:`AdapterFSDPStrategy` is
Lightning's :class:`~lightning.pytorch.strategies.FSDPStrategy` with what this model needs:

* **Units.** Every decoder block and every gated cross-attention block is an FSDP unit, and so
  are the image encoder, the projection and the fusion embedding (:func:`fsdp_units`). Each block
  of a media encoder (:meth:`encoders.MediaEncoder.blocks`) is a unit of its own inside its
  encoder's, so that the paper's ViT-H/14 (632M parameters, 2.5 GB in fp32) is gathered one
  block at a time, not whole. FSDP
  (v1) flattens a unit's parameters into one tensor of one dtype, so the bf16 frozen LM and the
  fp32 adapters must never share a unit: what is left in the root is the LM's embedding, final
  norm and output head, all frozen and in ``lm_dtype`` (checked, :func:`check_unit_dtypes`).
* **K/V projections.** A unit's parameters are gathered only while its ``forward`` runs, but
  :meth:`~adapters.cross_attention.GatedCrossAttention.media_kv` (computed once per batch, outside
  the block's ``forward``) uses ``k_proj``, ``v_proj`` and ``k_norm``: each is a small unit of its own.
* **Activation checkpointing** of the same decoder and cross-attention blocks, and of the blocks
  of every encoder that trains (:func:`checkpointed_blocks`). Gradients must flow through the
  frozen blocks to the adapters below them, so the frozen LM's activations are what dominates
  memory; a trained encoder's come next (ViT-H/14 at 448 px: 1,025 tokens through 40 blocks).
  The wrappers keep a recomputed BatchNorm from counting a batch twice (:func:`apply_recomputation`).
* **Frozen parameters and the optimizer.** ``use_orig_params=True``: FSDP keeps the original
  parameter objects (frozen ones get no gradient and no optimizer state), which the optimizer is
  built from, and allows a unit to mix frozen and trainable parameters. They become 1-D shards, so
  :class:`~mm_llama.training.module.AdapterModule` records names and shapes when it is built (weight
  decay must still find the matrices).
* **Dtypes.** No FSDP parameter casting: the LM is already in ``lm_dtype`` (bf16) and the adapters
  keep fp32 master weights; bf16 compute comes from ``precision: bf16-mixed`` (autocast). Buffers
  stay as they are (Lightning's default FSDP mixed precision would cast the RoPE frequencies to
  bf16), and gradients are reduced in fp32.
* **Checkpoints** hold only what trains. Saving gathers, one unit at a time onto rank 0's CPU,
  only the units that own a kept tensor (:meth:`AdapterFSDPStrategy.lightning_module_state_dict`):
  the frozen LM, most of a 70B model's 141 GB, is never gathered.
* **Gradient clipping** by norm goes through the FSDP root (:func:`clip_grad_norm`), which takes the
  norm over all shards; Lightning's FSDP precision plugin refuses norm clipping otherwise.
* **Validation.** Every forward gathers weights from all ranks together, so all ranks must run the
  same forwards: generation runs every step (:func:`is_sharded`), and every rank needs at least
  ``trainer.limit_val_batches`` validation batches. Answers are gathered from all ranks before
  exact match is computed (:func:`gather_to_all`, under DDP too).

The same blocks, and a frozen encoder's too, are what :func:`compile_blocks_` compiles
(``AdapterModule(compile_blocks=True)``).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (_CHECKPOINT_PREFIX,
                                                                        apply_activation_checkpointing)
from torch.distributed.fsdp._common_utils import FSDP_WRAPPED_MODULE
from torch import nn

from adapters import FusionEmbedding, GatedCrossAttention, MediaProjection
from adapters.speech_adapter import SpeechAdapter
from adapters.temporal import TemporalAggregator
from encoders.speech import SpeechEncoder
from encoders import ImageEncoder, MediaEncoder
from mm_llama.checkpoint_files import checkpoint_read_errors
from mm_llama.llama import DecoderLayer
from mm_llama.recompute import checkpoint_wrapper_for, is_recomputable
from mm_llama.training.optim import uses_loss_scaling

if TYPE_CHECKING:
    import lightning as L
    from torch.distributed.fsdp.wrap import CustomPolicy

CHECKPOINTED_BLOCKS: tuple[type[nn.Module], ...] = (DecoderLayer, GatedCrossAttention)
"""The LM-side blocks: recomputed in backward (with the trained encoders' blocks,
:func:`checkpointed_blocks`), and compiled by :func:`compile_blocks_` (with every encoder block)."""

FSDP_UNIT_CLASSES: tuple[type[nn.Module], ...] = (
    *CHECKPOINTED_BLOCKS, ImageEncoder, MediaProjection, FusionEmbedding,
    TemporalAggregator, SpeechEncoder, SpeechAdapter,  # the video and speech branches' own modules
)
"""Modules that are an FSDP unit of their own (besides the K/V modules of :data:`MEDIA_KV_MODULES`):
every trainable module, so that none lands in the root unit beside the (bf16) frozen LM."""

MEDIA_KV_MODULES: tuple[str, ...] = ("k_proj", "v_proj", "k_norm")
"""Submodules of a :class:`GatedCrossAttention` used by ``media_kv``, outside the block's ``forward``."""


def encoder_blocks(model: nn.Module, trainable_only: bool = False) -> list[nn.Module]:
    """The blocks of every media encoder in ``model`` (:meth:`encoders.MediaEncoder.blocks`);
    ``trainable_only``: only those of encoders with a parameter that trains."""
    return [block for module in model.modules() if isinstance(module, MediaEncoder)
            if not trainable_only or module.trains()
            for block in module.blocks()]


def checkpointed_blocks(model: nn.Module, every: int = 1) -> list[nn.Module]:
    """What ``AdapterFSDPStrategy(activation_checkpointing=True)`` recomputes in backward: every
    decoder and cross-attention block (:data:`CHECKPOINTED_BLOCKS`) and every block of an encoder
    that trains, with any part of it made recomputable (a hybrid ViT's stem,
    :func:`mm_llama.recompute.make_recomputable`). A frozen encoder keeps nothing for backward, so
    it is left alone.

    ``every=n`` keeps only decoder blocks ``0, n, 2n, ...`` of the decoder blocks, as
    :meth:`~mm_llama.model.MultimodalLlama.set_grad_checkpointing` does without FSDP.
    """
    decoder = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    others = [m for m in model.modules() if isinstance(m, CHECKPOINTED_BLOCKS) and not isinstance(m, DecoderLayer)]
    stems = [m for encoder in model.modules() if isinstance(encoder, MediaEncoder) and encoder.trains()
             for m in encoder.modules() if is_recomputable(m)]
    return decoder[::every] + others + encoder_blocks(model, trainable_only=True) + stems


def apply_recomputation(model: nn.Module, recomputed: set[int]) -> None:
    """Wrap each submodule of ``model`` whose ``id`` is in ``recomputed`` in a non-reentrant
    ``CheckpointWrapper`` (:func:`mm_llama.recompute.checkpoint_wrapper_for`: a BatchNorm inside
    counts each batch once). What ``AdapterFSDPStrategy`` does after sharding; Lightning's own
    setup would wrap with torch's plain wrapper, which lets a BatchNorm count a batch twice."""
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper_for,
                                   check_fn=lambda module: id(module) in recomputed)


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that :class:`AdapterFSDPStrategy` makes FSDP units, outermost first."""
    blocks = {id(m) for m in encoder_blocks(model)}
    units: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, FSDP_UNIT_CLASSES) or id(module) in blocks:
            units.append(module)
        if isinstance(module, GatedCrossAttention):
            units += [getattr(module, name) for name in MEDIA_KV_MODULES]
    return units


def fsdp_wrap_policy(model: nn.Module) -> CustomPolicy:
    """An FSDP ``auto_wrap_policy`` wrapping exactly :func:`fsdp_units` of ``model``."""
    from torch.distributed.fsdp.wrap import CustomPolicy

    chosen = {id(m) for m in fsdp_units(model)}
    return CustomPolicy(lambda module: id(module) in chosen)


def unit_dtypes(model: nn.Module, units: Iterable[nn.Module]) -> dict[str, set[torch.dtype]]:
    """Parameter dtypes of each FSDP unit (``""`` is the root), counting only what the unit itself
    holds (a nested unit's parameters are its own)."""
    units = list(units)
    owner: dict[int, str] = {}
    names = {id(m): name for name, m in model.named_modules()}
    for module in units:  # outermost first: nested units overwrite their parameters' owner
        for p in module.parameters():
            owner[id(p)] = names[id(module)]
    dtypes: dict[str, set[torch.dtype]] = {}
    for p in model.parameters():
        dtypes.setdefault(owner.get(id(p), ""), set()).add(p.dtype)
    return dtypes


def check_unit_dtypes(model: nn.Module, units: Iterable[nn.Module]) -> None:
    """Raise ``ValueError`` naming every FSDP unit whose parameters have more than one dtype."""
    mixed = {name or "<root>": sorted(map(str, d)) for name, d in unit_dtypes(model, units).items() if len(d) > 1}
    if mixed:
        raise ValueError(
            f"FSDP flattens each unit's parameters into one tensor of one dtype, but these units mix dtypes: "
            f"{mixed}. Keep every trainable module in its own unit (mm_llama.training.scale.FSDP_UNIT_CLASSES)."
        )


class AdapterFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP with the units, checkpointing and dtype handling of a frozen-LM adapter model.

    See the module docstring for why each setting is what it is. Use it from a config as
    ``trainer.strategy: {class_path: mm_llama.training.scale.AdapterFSDPStrategy, init_args: {...}}``.

    Args:
        activation_checkpointing: recompute the activations of decoder and cross-attention blocks,
            and of the blocks of every encoder that trains, in backward (:func:`checkpointed_blocks`);
            an integer ``n`` recomputes only every n-th decoder block (memory and time in between;
            ``0``/``false``: off).
        sharding_strategy: ``FULL_SHARD`` (ZeRO-3, for 70B), ``SHARD_GRAD_OP``, ``HYBRID_SHARD``
            (shard within a node, replicate across nodes) or ``NO_SHARD``.
        cpu_offload: keep the sharded parameters in CPU memory between uses.
        process_group_backend: ``nccl`` on GPUs by default; ``gloo`` on CPUs.
        timeout: collective timeout.
    """

    def __init__(
        self,
        activation_checkpointing: bool | int = True,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD",
        cpu_offload: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        from torch.distributed.fsdp import MixedPrecision

        if not isinstance(activation_checkpointing, int) or activation_checkpointing < 0:
            raise ValueError(f"AdapterFSDPStrategy.activation_checkpointing must be true, false or a block "
                             f"interval >= 1, got {activation_checkpointing!r}")
        # Which blocks to recompute depends on the model (its encoders, and whether they train):
        # chosen in _setup_model, not by Lightning's class-based policy. 0: none.
        self.checkpoint_every = int(activation_checkpointing)
        super().__init__(
            sharding_strategy=sharding_strategy,
            cpu_offload=cpu_offload,
            # One checkpoint file, written by rank 0, of which AdapterModule keeps only what trains.
            state_dict_type="full",
            process_group_backend=process_group_backend,
            timeout=timeout,
            # No casting of parameters or buffers; gradients reduced in fp32 (module docstring).
            mixed_precision=MixedPrecision(reduce_dtype=torch.float32),
            use_orig_params=True,
        )

    def _setup_model(self, model: nn.Module) -> nn.Module:
        """Wrap ``model`` (the LightningModule) in FSDP with :func:`fsdp_units` as units.

        Lightning's own ``_setup_model`` passes ``device_id=None`` on a CPU, which FSDP refuses; this
        one passes the root device, so a CPU run (gloo) shards the same way (used by the tests).
        """
        from torch.distributed.fsdp import FullyShardedDataParallel

        units = fsdp_units(model)
        check_unit_dtypes(model, units)
        every = self.checkpoint_every
        recomputed = {id(m) for m in checkpointed_blocks(model, every)} if every else set()
        wrapped = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device,
            **{**self.kwargs, "auto_wrap_policy": fsdp_wrap_policy(model)},
        )
        # After wrapping, as Lightning does: the checkpoint wrappers go inside the FSDP units.
        if recomputed:
            apply_recomputation(wrapped, recomputed)
        return wrapped

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The weights a checkpoint holds, whole (on rank 0 when sharded; every rank must call it).

        The LightningModule's ``keeps_in_checkpoint(name) -> bool`` (as
        :class:`~mm_llama.training.module.AdapterModule` has) names what a checkpoint keeps. Only the
        FSDP units owning such a parameter are gathered, one at a time, onto rank 0's CPU
        (``summon_full_params(unit, recurse=False, rank0_only=True, offload_to_cpu=True)``), in the
        same order on every rank; buffers are never sharded and are read as they are. Lightning's
        full state dict would gather every unit, the frozen LM too (141 GB for Llama 3.1 70B), and
        then keep the adapters. ``gathered_units`` records the units the last call gathered.
        Without ``keeps_in_checkpoint``, Lightning's full state dict is returned.

        On one process FSDP runs ``NO_SHARD``, and its full-state-dict hook then fails on the root
        unit ("FSDP assumes model.lm.embed_tokens.weight is in the state_dict", torch 2.11 to
        2.14; seen on a 1-GPU machine with ``configs/fsdp_llama3_8b.yaml``). Nothing is sharded
        then (nor with ``NO_SHARD`` on several), so the kept tensors are read as they are.
        """
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy

        keeps = getattr(self.lightning_module, "keeps_in_checkpoint", None)
        if keeps is None:
            return super().lightning_module_state_dict()

        def plain(name: str) -> str:
            return name.replace(f"{FSDP_WRAPPED_MODULE}.", "").replace(_CHECKPOINT_PREFIX, "")

        names = {id(p): plain(n) for n, p in self.model.named_parameters()}
        state: dict[str, Any] = {}
        self.gathered_units: list[str] = []
        for unit_name, unit in self.model.named_modules():
            if not isinstance(unit, FSDP):
                continue
            nested = {id(p) for inner in FSDP.fsdp_modules(unit) if inner is not unit for p in inner.parameters()}
            own = [p for p in unit.parameters() if id(p) not in nested and keeps(names[id(p)])]
            if not own:
                continue
            self.gathered_units.append(plain(unit_name))
            whole = unit.sharding_strategy == ShardingStrategy.NO_SHARD  # nothing to gather (nor supported)
            with nullcontext() if whole else FSDP.summon_full_params(
                    unit, recurse=False, writeback=False, rank0_only=True, offload_to_cpu=True):
                if self.global_rank == 0:
                    state.update((names[id(p)], p.detach().clone()) for p in own)
        if self.global_rank == 0:
            for module_name, module in self.model.named_modules():
                for buffer_name, buffer in module.named_buffers(recurse=False):
                    name = plain(f"{module_name}.{buffer_name}" if module_name else buffer_name)
                    if buffer_name not in module._non_persistent_buffers_set and keeps(name):
                        state[name] = buffer.detach().clone()
        return state

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The full optimizer state (on rank 0), as Lightning's, but never "offloaded" on a CPU.

        FSDP (torch 2.14) gathers the states of a parameter one after the other into one reused
        buffer and takes each out with ``.cpu()`` when offloading: on a CPU that is the buffer
        itself, so every state came out as the last one gathered (``exp_avg`` equal to
        ``exp_avg_sq``), and a run resumed under FSDP on CPU diverged from the uninterrupted one
        after its first step. Without offloading FSDP clones each state. On a GPU ``.cpu()``
        copies, and Lightning's way is kept.
        """
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.fsdp import (FullOptimStateDictConfig, FullStateDictConfig,
                                            FullyShardedDataParallel as FSDP, OptimStateKeyType, StateDictType)

        if self._state_dict_type != "full" or self.root_device.type != "cpu":
            return super().optimizer_state(optimizer)
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
                                  FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True)):
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:  # keyed by parameter index, as Lightning stores it
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
        return state

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's loading of a one-file checkpoint, but memory-mapped rather than lazily read.

        Lightning reads the file lazily and then materialises what is left with
        ``apply_to_collection``, which refuses the frozen dataclasses among this project's
        hyper-parameters ("A frozen dataclass was passed to `apply_to_collection`"): resuming under
        FSDP failed. Here the file is memory-mapped instead (``torch.load(mmap=True)``): nothing is
        read before it is used, and there is nothing to materialise.
        The weights also stay in the returned checkpoint (Lightning drops them), so that
        :meth:`~mm_llama.training.module.AdapterModule.on_load_checkpoint` can check their names.
        The weights then load as Lightning loads them (gathered unit by unit, written back to the
        shards), and the optimizer states through ``FSDP.optim_state_dict_to_load``.
        """
        from lightning.fabric.strategies.fsdp import _get_full_state_dict_context, _is_full_checkpoint
        from lightning.fabric.strategies.model_parallel import _load_raw_module_state
        from lightning.pytorch.trainer.states import TrainerFn
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, OptimStateKeyType

        path = Path(self.broadcast(checkpoint_path))
        if not _is_full_checkpoint(path):
            return super().load_checkpoint(path, weights_only)
        # Memory-mapped: each tensor is read from the file when used, and the ranks of a node share the
        # pages. A truncated file: CorruptCheckpointError naming it.
        with checkpoint_read_errors(path):
            checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        _load_raw_module_state(checkpoint["state_dict"], module=self.model, world_size=self.world_size,
                               strict=self.lightning_module.strict_loading)
        states = checkpoint.get("optimizer_states")
        if states is None or self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
            return checkpoint
        if len(states) != len(self.optimizers):
            raise RuntimeError(f"the checkpoint holds {len(states)} optimizer states, the run has "
                               f"{len(self.optimizers)} optimizers")
        with _get_full_state_dict_context(self.model, world_size=self.world_size, rank0_only=False):
            for optimizer, state in zip(self.optimizers, states):
                if isinstance(next(iter(state["state"]), None), int):  # saved by a plain (unsharded) optimizer
                    state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_NAME, self.model)
                optimizer.load_state_dict(FSDP.optim_state_dict_to_load(model=self.model, optim=optimizer,
                                                                         optim_state_dict=state))
        return checkpoint


def is_sharded(trainer: L.Trainer | None) -> bool:
    """Whether ``trainer`` shards the model with FSDP (then every rank must run the same forwards)."""
    return trainer is not None and isinstance(trainer.strategy, FSDPStrategy)


def gather_to_all(items: list, trainer: L.Trainer | None) -> list:
    """``items`` of every rank, concatenated in rank order, on every rank (``items`` alone without a
    process group). Every rank must call it."""
    if trainer is None or trainer.world_size == 1 or not torch.distributed.is_initialized():
        return items
    gathered: list[list | None] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, items)
    return [item for part in gathered for item in (part or [])]


def clip_grad_norm(trainer: L.Trainer, optimizer: torch.optim.Optimizer, max_norm: float) -> bool:
    """Clip gradients by their global norm where Lightning's own clipping is wrong or refuses.

    * Under FSDP: through the FSDP root, over all shards.
    * With an optimizer that unscales its own gradients (fused AdamW, :func:`build_optimizer`'s
      default) and no loss scaling: Lightning's mixed-precision plugin refuses to clip for it even
      under ``bf16-mixed``, which has nothing to unscale; the gradients are clipped here instead.

    Returns ``False`` (and does nothing) elsewhere, where Lightning's own clipping is right.
    """
    if isinstance(trainer.strategy, FSDPStrategy):
        trainer.strategy.model.clip_grad_norm_(max_norm)
        return True
    optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's own
    if getattr(optimizer, "_step_supports_amp_scaling", False) and not uses_loss_scaling(trainer):
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return True
    return False


class ClipsGradients:
    """Mixin (before ``L.LightningModule``) for modules whose optimizer comes from
    :func:`~mm_llama.training.optim.build_optimizer`: clipping by norm goes through
    :func:`clip_grad_norm`, anything else to Lightning. The gradients are dropped as soon as the
    optimizer has stepped (:meth:`optimizer_step`)."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        by_norm = gradient_clip_val and gradient_clip_algorithm in (None, "norm")
        if not (by_norm and clip_grad_norm(self.trainer, optimizer, gradient_clip_val)):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Step, then set the gradients to ``None``. Lightning zeroes them only between the next
        forward and its backward, so the last step's gradients would stay alive through the
        forward, where the saved activations peak; HF's Trainer drops them after the step too.
        With gradient accumulation this runs only when the optimizer steps."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)


def compile_blocks_(model: nn.Module, **compile_kwargs) -> list[nn.Module]:
    """``torch.compile`` in place every :data:`CHECKPOINTED_BLOCKS` module of ``model`` and every
    block of its media encoders (:meth:`encoders.MediaEncoder.blocks`, frozen or not: a frozen
    encoder still runs its forward every step).

    Block by block (``nn.Module.compile``) rather than the whole model: parameter names do not
    change (checkpoints load as before), FSDP units and activation-checkpoint wrappers stay around
    single blocks, and one compiled graph serves all blocks of a shape. Returns the compiled
    modules, the LM's blocks first.
    """
    blocks = [m for m in model.modules() if isinstance(m, CHECKPOINTED_BLOCKS)] + encoder_blocks(model)
    for block in blocks:
        block.compile(**compile_kwargs)
    return blocks
