"""Scale-out settings on CPU: the shipped configs parse and build through ``mm-llama``'s
LightningCLI, the FSDP strategy shards along our blocks, a bf16 frozen LM leaves what trains
in fp32 and trains like fp32, and ``compile_blocks`` compiles exactly the blocks.

The 2-process runs (DDP, and FSDP on CPU over gloo) are in ``tests/test_distributed.py``.
"""

from __future__ import annotations

import dataclasses

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from adapters import FusionEmbedding, GatedCrossAttention, MediaProjection
from encoders import ImageEncoder
from mm_llama.cli import AdapterCLI, cli_kwargs, main
from mm_llama.data.scenes import make_default_shards
from mm_llama.lm import parameters_digest
from mm_llama.llama import DecoderLayer
from mm_llama.training.console import PartsSummary, StepProgressBar
from mm_llama.training.datamodule import ImageDataModule, model_inputs
from mm_llama.training.module import AdapterModule
from mm_llama.training.optim import OptimConfig
from mm_llama.training.scale import (
    AdapterFSDPStrategy,
    check_unit_dtypes,
    checkpointed_blocks,
    compile_blocks_,
    fsdp_units,
    fsdp_wrap_policy,
    unit_dtypes,
)
from tests.test_training import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# Config files that are layered over another (as their headers say), and the one they extend.
OVERLAYS = {"multinode.yaml": "image.yaml", "fsdp_llama3_70b.yaml": "fsdp_llama3_8b.yaml"}
# The scale-out configs as they are used; the instantiation test builds each of these.
CONFIG_SETS = {
    "image": ["image.yaml"],
    "multinode": ["image.yaml", "multinode.yaml"],
    "fsdp-8b": ["fsdp_llama3_8b.yaml"],
    "fsdp-70b": ["fsdp_llama3_8b.yaml", "fsdp_llama3_70b.yaml"],
}
# Every shipped config: the sets above, and any other file alone.
ALL_CONFIGS = {**CONFIG_SETS, **{
    p.name: [p.name] for p in sorted(CONFIGS.glob("*.yaml"))
    if p.name not in OVERLAYS and all(p.name not in files for files in CONFIG_SETS.values())
}}  # fmt: skip
TINY_ENCODER = {  # the CPU-sized encoder of tests/test_training.py, as command-line overrides
    "backbone": "timm:vit_tiny_patch16_224", "image_size": "16", "patch_size": "8", "depth": "2", "width": "32",
    "heads": "2", "intermediate_layers": "[0]", "n_global_layers": "0",
}  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


@pytest.fixture(autouse=True)
def _bare_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["mm-llama"])  # LightningCLI warns when args and sys.argv both carry options


def config_args(name: str) -> list[str]:
    return [arg for file in ALL_CONFIGS[name] for arg in ("--config", str(CONFIGS / file))]


def test_every_config_file_is_validated():
    tested = {file for files in ALL_CONFIGS.values() for file in files}
    assert {p.name for p in CONFIGS.glob("*.yaml")} == tested
    layered = [files[-2:] for files in ALL_CONFIGS.values()]
    assert all([base, overlay] in layered for overlay, base in OVERLAYS.items())


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_shipped_config_validates(name, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", *config_args(name), "--print_config"])
    assert info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    trainer, model, data = config["trainer"], config["model"], config["data"]["init_args"]
    assert model["optim"]["total_steps"] == trainer["max_steps"]  # the cosine spans the run
    assert isinstance(trainer["val_check_interval"], int)  # ranks stay in step (DESIGN §9)
    if name not in ("multinode", "fsdp-8b", "fsdp-70b"):
        return
    # several GPUs: equal steps on every rank, a bf16 LM, GPUs
    assert data["resampled"] is True and data["epoch_length"] > 0
    assert model["lm_dtype"] == "bfloat16" and trainer["precision"] == "bf16-mixed"
    assert trainer["accelerator"] == "gpu" and trainer["devices"] == 8
    if name == "multinode":
        assert trainer["strategy"] == "ddp" and trainer["num_nodes"] == 2
        return
    strategy = trainer["strategy"]
    assert strategy["class_path"] == "mm_llama.training.scale.AdapterFSDPStrategy"
    assert strategy["init_args"]["activation_checkpointing"] is True
    assert trainer["num_nodes"] == (4 if name == "fsdp-70b" else 1)
    assert model["lm"].endswith("Llama-3.1-70B-Instruct" if name == "fsdp-70b" else "Llama-3.1-8B-Instruct")
    assert model["model"]["image_encoder"]["backbone"] == "open_clip:ViT-H-14"


@pytest.mark.parametrize(("old", "new", "key"), [
    ("      activation_checkpointing: true", "      activation_checkpointng: true", "activation_checkpointng"),
    ("  lm_dtype: bfloat16", "  lm_dtype: bf16", "lm_dtype"),
    ("      sharding_strategy: FULL_SHARD", "      sharding_strategy: FULL", "sharding_strategy"),
])  # fmt: skip
def test_bad_fsdp_config_value_is_named(tmp_path, capsys, old, new, key):
    text = (CONFIGS / "fsdp_llama3_8b.yaml").read_text()
    assert old in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(old, new))
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(bad), "--print_config"])
    assert info.value.code == 2
    assert key in capsys.readouterr().err


@pytest.mark.parametrize("name", CONFIG_SETS)
def test_shipped_config_builds_model_data_and_trainer(name, tiny_lm_dir, tmp_path):
    """Everything the config names is instantiated (the tiny LM and encoder stand in for the real ones)."""
    overrides = ["--model.lm", str(tiny_lm_dir), "--trainer.accelerator", "cpu", "--trainer.logger", "false",
                 "--trainer.default_root_dir", str(tmp_path)]
    overrides += [arg for key, value in TINY_ENCODER.items() for arg in (f"--model.model.image_encoder.{key}", value)]
    cli = AdapterCLI(**{**cli_kwargs(), "save_config_callback": None}, run=False,
                     args=[*config_args(name), *overrides])
    assert isinstance(cli.model, AdapterModule) and isinstance(cli.datamodule, ImageDataModule)
    lm_params = list(cli.model.model.lm.parameters())
    expected_dtype = torch.float32 if name == "image" else torch.bfloat16
    assert {p.dtype for p in lm_params} == {expected_dtype}
    assert {p.dtype for p in cli.model.model.parameters() if p.requires_grad} == {torch.float32}
    strategy = cli.trainer.strategy
    if name.startswith("fsdp"):
        assert isinstance(strategy, AdapterFSDPStrategy)
        assert cli.trainer.num_nodes == (4 if name == "fsdp-70b" else 1)
        check_unit_dtypes(cli.model, fsdp_units(cli.model))  # what FSDP would flatten is uniform
    else:
        assert type(strategy).__name__ == ("DDPStrategy" if name == "multinode" else "SingleDeviceStrategy")
    assert isinstance(cli.trainer.progress_bar_callback, StepProgressBar)  # beside the config's own callbacks
    assert [type(c) for c in cli.trainer.callbacks if isinstance(c, L.pytorch.callbacks.ModelSummary)] == [PartsSummary]
    assert any(type(c).__name__ == "ModelCheckpoint" for c in cli.trainer.callbacks)


def test_fsdp_config_takes_a_decoder_block_interval_for_recomputation(tiny_lm_dir, tmp_path):
    overrides = ["--model.lm", str(tiny_lm_dir), "--trainer.accelerator", "cpu", "--trainer.logger", "false",
                 "--trainer.default_root_dir", str(tmp_path), "--trainer.strategy.activation_checkpointing", "2"]
    overrides += [arg for key, value in TINY_ENCODER.items() for arg in (f"--model.model.image_encoder.{key}", value)]
    cli = AdapterCLI(**{**cli_kwargs(), "save_config_callback": None}, run=False,
                     args=[*config_args("fsdp-8b"), *overrides])
    assert cli.trainer.strategy.checkpoint_every == 2


def test_cli_progress_bar_and_summary_can_be_turned_off(tiny_lm_dir, tmp_path):
    overrides = ["--model.lm", str(tiny_lm_dir), "--trainer.accelerator", "cpu", "--trainer.logger", "false",
                 "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
                 "--trainer.enable_model_summary", "false"]
    overrides += [arg for key, value in TINY_ENCODER.items() for arg in (f"--model.model.image_encoder.{key}", value)]
    cli = AdapterCLI(**{**cli_kwargs(), "save_config_callback": None}, run=False,
                     args=[*config_args("image"), *overrides])
    assert cli.trainer.progress_bar_callback is None
    assert not any(isinstance(c, (StepProgressBar, PartsSummary)) for c in cli.trainer.callbacks)


# --------------------------------------------------------------------------- FSDP policies


@pytest.fixture(scope="module")
def bf16_module(tiny_lm_dir) -> AdapterModule:
    torch.manual_seed(0)
    return AdapterModule(lm=str(tiny_lm_dir), model=TINY_MODEL, lm_dtype="bfloat16")


def test_fsdp_strategy_carries_the_wrap_and_checkpointing_policies(bf16_module):
    strategy = AdapterFSDPStrategy()
    assert strategy.checkpoint_every == 1 and AdapterFSDPStrategy(activation_checkpointing=False).checkpoint_every == 0
    assert AdapterFSDPStrategy(activation_checkpointing=2).checkpoint_every == 2
    for bad in (-1, 1.5, "2"):
        with pytest.raises(ValueError, match="true, false or a block interval >= 1"):
            AdapterFSDPStrategy(activation_checkpointing=bad)
    assert strategy._activation_checkpointing_kwargs == {}  # chosen per model, not by Lightning's class policy
    assert strategy.kwargs["use_orig_params"] is True  # frozen and trainable parameters, original names
    assert strategy.sharding_strategy.name == "FULL_SHARD"
    precision = strategy.mixed_precision_config  # no casting of parameters or buffers (RoPE stays fp32)
    assert precision.param_dtype is None and precision.buffer_dtype is None
    assert precision.reduce_dtype == torch.float32

    model = bf16_module.model
    policy = fsdp_wrap_policy(model)
    wrapped = [m for m in model.modules() if policy._lambda_fn(m)]
    blocks = list(model.cross_attn.values())
    vit_blocks = list(model.image_encoder.backbone.model.blocks)  # each its own unit, inside the encoder's
    assert len(vit_blocks) == 2
    expected = [*model.lm.layers, *blocks, model.image_encoder, *vit_blocks, model.image_projection,
                model.fusion_embed]
    expected += [getattr(b, name) for b in blocks for name in ("k_proj", "v_proj", "k_norm")]  # used by media_kv
    assert {id(m) for m in wrapped} == {id(m) for m in expected} and len(wrapped) == len(expected)
    assert all(isinstance(m, (DecoderLayer, GatedCrossAttention, ImageEncoder, MediaProjection, FusionEmbedding))
               or any(m is b for b in vit_blocks)
               or any(m is getattr(b, n) for b in blocks for n in ("k_proj", "v_proj", "k_norm")) for m in wrapped)
    # Recomputed in backward: the LM's and cross-attention blocks, and the encoder's while it trains.
    recomputed = {id(m) for m in checkpointed_blocks(model)}
    assert recomputed == {id(m) for m in [*model.lm.layers, *blocks, *vit_blocks]}
    # Every 2nd decoder block (the LM here has 4): blocks 0 and 2, and still every other block.
    every_2nd = {id(m) for m in checkpointed_blocks(model, every=2)}
    assert every_2nd == {id(m) for m in [model.lm.layers[0], model.lm.layers[2], *blocks, *vit_blocks]}
    model.image_encoder.requires_grad_(False)
    try:
        assert {id(m) for m in checkpointed_blocks(model)} == {id(m) for m in [*model.lm.layers, *blocks]}
    finally:
        model.apply_trainable()


def test_every_fsdp_unit_has_one_dtype_and_the_root_holds_only_the_frozen_lm(bf16_module):
    model = bf16_module.model
    dtypes = unit_dtypes(model, fsdp_units(model))
    assert dtypes[""] == {torch.bfloat16}  # the root: the LM's embedding, final norm (and head)
    assert dtypes["lm.layers.0"] == {torch.bfloat16} and dtypes["cross_attn.3"] == {torch.float32}
    assert all(len(d) == 1 for d in dtypes.values())
    root_units = set(fsdp_units(model))
    in_units = {id(p) for unit in root_units for p in unit.parameters()}
    root_names = [n for n, p in model.named_parameters() if id(p) not in in_units]
    assert root_names and all(n.startswith("lm.") for n in root_names)
    # A trainable module left out of the units lands in the bf16 root: refused, naming the root.
    without_projection = [m for m in fsdp_units(model) if m is not model.image_projection]
    with pytest.raises(ValueError, match=r"<root>.*bfloat16.*float32"):
        check_unit_dtypes(model, without_projection)


def test_video_and_speech_branches_are_fsdp_units_of_one_dtype(tiny_lm_dir):
    from adapters.speech_adapter import SpeechAdapterConfig
    from encoders.speech import SpeechEncoderConfig
    from mm_llama.video_adapter import VideoConfig

    torch.manual_seed(0)
    model_cfg = dataclasses.replace(
        TINY_MODEL, video=VideoConfig(frames=4, frames_per_group=2, depth=1, heads=2, every=1),
        speech_encoder=SpeechEncoderConfig(dim=32, depth=1, heads=2, ffn_dim=64),
        speech_adapter=SpeechAdapterConfig(fusion="cross_attention", dim=32, heads=2, ffn_dim=64))
    model = AdapterModule(lm=str(tiny_lm_dir), model=model_cfg, lm_dtype="bfloat16").model
    units = fsdp_units(model)
    for branch in (model.video.aggregator, model.video.projection, *model.video.cross_attn.values(),
                   model.speech_encoder, *model.speech_encoder.blocks(), model.speech_adapter):
        assert any(unit is branch for unit in units), type(branch).__name__
    check_unit_dtypes(model, units)  # no fp32 branch left in the bf16 root
    in_units = {id(p) for unit in units for p in unit.parameters()}
    assert all(n.startswith("lm.") for n, p in model.named_parameters() if id(p) not in in_units)


# --------------------------------------------------------------------------- bf16 LM


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_default_shards(root, image_size=16, n_train=8, n_val=4, n_test=4, samples_per_shard=4, min_shards=2,
                        progress=False)
    return root


def loss_and_grads(module: AdapterModule, batch: dict) -> tuple[float, torch.Tensor]:
    module.zero_grad()
    loss = module.model.loss(batch["input_ids"], batch["labels"], batch["images"])
    loss.backward()
    grads = [p.grad.flatten() for _, p in sorted(module.model.named_parameters()) if p.grad is not None]
    return loss.item(), torch.cat(grads)


def test_bf16_lm_keeps_what_trains_fp32_and_trains_like_fp32(tiny_lm_dir, bf16_module, shapes_dir, tmp_path):
    model = bf16_module.model
    assert {p.dtype for p in model.lm.parameters()} == {torch.bfloat16}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and {p.dtype for p in trainable.values()} == {torch.float32}
    assert not any(n.startswith("lm.") for n in trainable)

    torch.manual_seed(0)
    fp32_module = AdapterModule(lm=str(tiny_lm_dir), model=TINY_MODEL)
    datamodule = ImageDataModule(data_dir=str(shapes_dir), batch_size=4, num_workers=0, shuffle_buffer=4)
    datamodule.connect(model_inputs(fp32_module))
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    loss32, grad32 = loss_and_grads(fp32_module, batch)
    loss16, grad16 = loss_and_grads(bf16_module, batch)
    assert grad16.dtype == torch.float32 and grad16.shape == grad32.shape
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-9): the loss moves by well under 1 %
    # (measured 1e-4 to 4e-4 relative on two batches) and the gradient keeps its direction (measured
    # cosine 0.99999 over all trainable gradients).
    assert abs(loss16 - loss32) <= 1e-2 * abs(loss32)
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.99

    # ...and trains through Lightning on a CPU (fp32 precision), the frozen LM untouched.
    digest = parameters_digest(model.lm)
    bf16_module.optim_cfg = OptimConfig(lr=1e-2, warmup_steps=0, total_steps=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=1.0, default_root_dir=str(tmp_path))
    before = {n: p.detach().clone() for n, p in trainable.items()}
    trainer.fit(bf16_module, datamodule=datamodule)
    assert trainer.global_step == 2 and parameters_digest(model.lm) == digest
    assert any(not torch.equal(before[n], p) for n, p in trainable.items())
    assert {p.dtype for p in trainable.values()} == {torch.float32}


def test_unknown_lm_dtype_is_named(tiny_lm_dir):
    with pytest.raises(ValueError, match=r"lm_dtype must be one of \['bfloat16', 'float32'\], got 'float16'"):
        AdapterModule(lm=str(tiny_lm_dir), model=TINY_MODEL, lm_dtype="float16")


# --------------------------------------------------------------------------- torch.compile


def test_compile_blocks_compiles_each_block_and_keeps_the_names(tiny_lm_dir):
    """``compile_blocks=True`` marks exactly the decoder, cross-attention and ViT blocks for compilation.

    Not run with inductor here: the first compiled training step of the tiny model took 112 s on the
    busy 2-core CPU (code generation and a C++ build per block shape). Dynamo's capture of the same
    blocks is checked below with the ``eager`` backend, which runs the captured graphs as they are.
    """
    torch.manual_seed(0)
    compiled = AdapterModule(lm=str(tiny_lm_dir), model=TINY_MODEL, compile_blocks=True)
    torch.manual_seed(0)
    plain = AdapterModule(lm=str(tiny_lm_dir), model=TINY_MODEL)
    marked = [n for n, m in compiled.model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]
    blocks = [n for n, m in compiled.model.named_modules() if isinstance(m, (DecoderLayer, GatedCrossAttention))]
    vit_blocks = [n for n, m in compiled.model.named_modules() if m in compiled.model.image_encoder.blocks()]
    assert len(blocks) == 4 + len(compiled.model.cross_attn) and vit_blocks == [
        "image_encoder.backbone.model.blocks.0", "image_encoder.backbone.model.blocks.1"]
    assert sorted(marked) == sorted(blocks + vit_blocks)
    assert list(compiled.state_dict()) == list(plain.state_dict())  # checkpoints load either way


def test_compiled_blocks_compute_what_plain_blocks_compute(tiny_lm_dir, shapes_dir):
    torch.manual_seed(0)
    module = AdapterModule(lm=str(tiny_lm_dir), model=TINY_MODEL)
    datamodule = ImageDataModule(data_dir=str(shapes_dir), batch_size=2, num_workers=0, shuffle_buffer=0)
    datamodule.connect(model_inputs(module))
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    loss, grads = loss_and_grads(module, batch)
    torch._dynamo.reset()
    compiled = compile_blocks_(module.model, backend="eager", fullgraph=True)  # fullgraph: no graph break
    assert len(compiled) == 4 + len(module.model.cross_attn) + 2  # the LM's blocks, then the ViT's two
    assert compiled[-2:] == module.model.image_encoder.blocks()
    compiled_loss, compiled_grads = loss_and_grads(module, batch)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(compiled_grads, grads, rtol=1e-5, atol=1e-7)
    module.model.set_grad_checkpointing(True)  # compiled blocks recomputed in backward: the same again
    recomputed_loss, recomputed_grads = loss_and_grads(module, batch)
    torch.testing.assert_close(recomputed_loss, loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(recomputed_grads, grads, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- activation checkpointing


def _fit_two_steps(tiny_lm_dir, shapes_dir, tmp_path, checkpointing: bool) -> tuple[AdapterModule, list[str]]:
    """Two Lightning steps of a fresh module; which blocks ran with gradients on, in order."""
    L.seed_everything(0)
    module = AdapterModule(lm=str(tiny_lm_dir), model=TINY_MODEL, activation_checkpointing=checkpointing,
                           optim=OptimConfig(lr=1e-2, warmup_steps=0, total_steps=2))
    calls = []
    for name, block in [("layer0", module.model.lm.layers[0]), *module.model.cross_attn.items()]:
        block.register_forward_pre_hook(lambda *_, name=name: calls.append(name) if torch.is_grad_enabled() else None)
    datamodule = ImageDataModule(data_dir=str(shapes_dir), batch_size=4, num_workers=0, shuffle_buffer=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path / str(checkpointing)))
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2
    return module, calls


def test_activation_checkpointing_without_fsdp_recomputes_each_block_and_trains_the_same(
        tiny_lm_dir, shapes_dir, tmp_path):
    plain, plain_calls = _fit_two_steps(tiny_lm_dir, shapes_dir, tmp_path, checkpointing=False)
    ckpt, ckpt_calls = _fit_two_steps(tiny_lm_dir, shapes_dir, tmp_path, checkpointing=True)
    blocks = ["layer0", *plain.model.cross_attn]
    assert sorted(plain_calls) == sorted(blocks * 2)  # once a step
    assert sorted(ckpt_calls) == sorted(blocks * 4)  # and again in each backward
    digest = parameters_digest(plain.model.lm)
    assert parameters_digest(ckpt.model.lm) == digest  # both started from the same file and left it alone
    trained = dict(plain.model.named_parameters())
    for name, p in ckpt.model.named_parameters():
        torch.testing.assert_close(p, trained[name], rtol=0, atol=1e-5, msg=name)
    assert list(ckpt.state_dict()) == list(plain.state_dict())  # no wrapper names: checkpoints load either way


def test_activation_checkpointing_takes_a_block_interval(tiny_lm_dir):
    for value, expected in ((False, (False, 1)), (True, (True, 1)), (0, (False, 1)), (1, (True, 1)), (3, (True, 3))):
        lm = AdapterModule(lm=str(tiny_lm_dir), model=TINY_MODEL, activation_checkpointing=value).model.lm
        assert (lm.grad_checkpointing, lm.checkpoint_every) == expected, value
    with pytest.raises(ValueError, match="activation_checkpointing must be true, false or a block interval"):
        AdapterModule(lm=str(tiny_lm_dir), model=TINY_MODEL, activation_checkpointing=-2)


def test_module_activation_checkpointing_under_fsdp_points_at_the_strategys(tiny_lm_dir):
    module = AdapterModule(lm=str(tiny_lm_dir), model=TINY_MODEL, activation_checkpointing=True)
    for checkpointing in (True, False):
        module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False,
                                   strategy=AdapterFSDPStrategy(activation_checkpointing=checkpointing))
        with pytest.raises(ValueError, match=r"set AdapterFSDPStrategy\(activation_checkpointing=true\)"):
            module.setup("fit")
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, strategy="ddp")
    module.setup("fit")  # DDP (and one device) recompute through the module


# --------------------------------------------------------------------------- generation under FSDP


def test_generation_can_run_every_step_for_sharded_models(tiny_lm_dir, monkeypatch):
    """Under FSDP every rank must run the same forwards: ``stop_early=False`` (what AdapterModule passes
    when the trainer shards) runs all steps, with the same output."""
    from mm_llama.generation import generate

    torch.manual_seed(0)
    module = AdapterModule(lm=str(tiny_lm_dir), model=TINY_MODEL)
    model, tok = module.model, module.tokenizer
    forwards = []
    hidden_states = model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda *a, **k: forwards.append(1) or hidden_states(*a, **k))
    prompt = [tok.encode("Describe the image.")]
    every_id_stops = list(range(model.lm.cfg.vocab_size))  # every row stops at its first token
    outputs = {}
    for stop_early in (True, False):
        forwards.clear()
        outputs[stop_early] = generate(model, prompt, None, max_new_tokens=5, stop_ids=every_id_stops,
                                       pad_id=tok.pad_id, stop_early=stop_early)
        outputs[stop_early, "forwards"] = len(forwards)
    assert outputs[True] == outputs[False] == [[]]
    assert outputs[True, "forwards"] == 1 and outputs[False, "forwards"] == 5  # prefill + 4 decode steps
