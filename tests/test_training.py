"""Lightning integration on a tiny random LM and real tar shards: the frozen LM stays
frozen, checkpoints hold only what trains and resume exactly, and the run function
writes every artefact of ``train_adapter.py``."""

from __future__ import annotations

import json
import warnings

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from encoders import ImageEncoderConfig
from mm_llama.data.scenes import make_default_shards
from mm_llama.lm import parameters_digest
from mm_llama.model import CrossAttentionConfig, ModelConfig
from mm_llama.training import modalities, run_config
from mm_llama.training import run as run_module
from mm_llama.training.datamodule import ImageDataModule, default_shard_urls
from mm_llama.training.module import AdapterModule
from mm_llama.training.optim import OptimConfig

TINY_MODEL = ModelConfig(
    image_encoder=ImageEncoderConfig(
        backbone="timm:vit_tiny_patch16_224", image_size=16, patch_size=8, depth=2, width=32, heads=2,
        intermediate_layers=(0,)),
    cross_attention=CrossAttentionConfig(every=2),
)
N_TEST = 8
REQUIRED_METRICS = {
    "exact_match", "exact_match_heldout_combos", "train_seconds", "trainable_params", "peak_rss_mb",
    "skipped", "steps", "lm",
}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    """Built-in shards, tiny: 2 shards per split, 16x16 images."""
    root = tmp_path_factory.mktemp("shapes")
    make_default_shards(root, image_size=16, n_train=48, n_val=8, n_test=N_TEST, samples_per_shard=24,
                        min_shards=2, progress=False)
    return root


def make_module(lm_dir, seed: int = 0) -> AdapterModule:
    torch.manual_seed(seed)
    return AdapterModule(lm=str(lm_dir), model=TINY_MODEL, eval_max_new_tokens=4,
                         optim=OptimConfig(lr=1e-2, warmup_steps=0, total_steps=10))


def make_datamodule(data_dir) -> ImageDataModule:
    return ImageDataModule(data_dir=str(data_dir), batch_size=4, num_workers=0, val_samples=4, shuffle_buffer=8)


def make_trainer(root, **overrides) -> L.Trainer:
    kwargs = dict(
        accelerator="cpu", max_steps=4, limit_train_batches=2, val_check_interval=2, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(root),
    )
    return L.Trainer(**{**kwargs, **overrides})


def trainable(module: AdapterModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.trainable_state_dict().items()}


@pytest.fixture(scope="module")
def trained(tiny_lm_dir, shapes_dir, tmp_path_factory):
    """Two epochs of two steps each, validated at steps 2 and 4, then tested; checkpoint saved."""
    root = tmp_path_factory.mktemp("trained")
    module, datamodule = make_module(tiny_lm_dir), make_datamodule(shapes_dir)
    before = {"lm": parameters_digest(module.model.lm), "trainable": trainable(module)}
    trainer = make_trainer(root)
    with warnings.catch_warnings(record=True) as fit_warnings:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=datamodule)
    after_fit = {"lm": parameters_digest(module.model.lm), "val": module.last_eval}
    trainer.test(module, datamodule=datamodule, verbose=False)
    ckpt = root / "adapter.ckpt"
    trainer.save_checkpoint(ckpt)
    return {"module": module, "datamodule": datamodule, "trainer": trainer, "before": before,
            "after_fit": after_fit, "ckpt": ckpt, "fit_warnings": [str(w.message) for w in fit_warnings]}


def test_fit_trains_the_adapters_and_never_the_lm(trained):
    module, trainer = trained["module"], trained["trainer"]
    assert trainer.global_step == 4 and trainer.current_epoch == 2
    assert trained["after_fit"]["lm"] == trained["before"]["lm"]  # frozen means frozen
    assert parameters_digest(module.model.lm) == trained["before"]["lm"]
    before, now = trained["before"]["trainable"], trainable(module)
    assert set(before) == set(now)
    for group in ("image_encoder.", "image_projection.", "cross_attn."):
        changed = [k for k in now if k.startswith(group) and not torch.equal(now[k], before[k])]
        assert changed, f"no {group} tensor changed"
    gates = [k for k in now if k.startswith("cross_attn.") and "gate" in k]
    assert gates and all(not torch.equal(now[k], before[k]) for k in gates)


def test_frozen_parts_in_eval_mode_raise_no_warning(trained):
    """The frozen LM is in eval mode on purpose: neither Lightning's count of eval-mode modules
    nor our check of trainable ones speaks up for the default model."""
    assert not [w for w in trained["fit_warnings"] if "in eval mode" in w], trained["fit_warnings"]
    assert not trained["module"].model.lm.training and trained["module"].model.cross_attn.training


class RecordModes(L.Callback):
    """(image encoder, any of its modules, cross-attention, LM) ``training`` flags at each training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, bool, bool, bool]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        m = pl_module.model
        self.seen.append((m.image_encoder.training, any(x.training for x in m.image_encoder.modules()),
                          m.cross_attn.training, any(x.training for x in m.lm.modules())))


def test_the_models_own_train_sets_the_modes_a_fit_trains_in(tiny_lm_dir, shapes_dir, tmp_path):
    """Lightning keeps the modes modules were built in; ``TrainModes`` calls ``train()`` when training
    starts. A trainable part left in eval mode trains in train mode, a frozen part (the image encoder,
    as in stage 2) stays in eval mode, and so it is after every validation."""
    import dataclasses

    torch.manual_seed(0)
    frozen_encoder = dataclasses.replace(TINY_MODEL, trainable=("projection", "cross_attention", "fusion_embedding"))
    module = AdapterModule(lm=str(tiny_lm_dir), model=frozen_encoder, eval_max_new_tokens=2,
                           optim=OptimConfig(lr=1e-2, warmup_steps=0, total_steps=10))
    assert module.model.image_encoder.training  # as built
    module.model.cross_attn.eval()  # e.g. put in eval mode for a look at its answers, then trained
    record = RecordModes()
    make_trainer(tmp_path, max_steps=3, limit_train_batches=3, val_check_interval=1, limit_val_batches=1,
                 callbacks=[record]).fit(module, datamodule=make_datamodule(shapes_dir))
    assert record.seen == [(False, False, True, False)] * 3


def test_a_trainable_module_left_in_eval_mode_is_named(tiny_lm_dir, shapes_dir, tmp_path):
    module = make_module(tiny_lm_dir)
    model = module.model

    def train(mode: bool = True):  # a train() override that forgets what trains
        type(model).train(model, mode)
        model.cross_attn.eval()
        return model

    model.train = train
    with pytest.warns(PossibleUserWarning, match=r"trainable weights are in eval mode .*: model\.cross_attn\.\d"):
        make_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, datamodule=make_datamodule(shapes_dir))


def test_epoch_reaches_the_training_shards_and_nothing_is_skipped(trained):
    datamodule = trained["datamodule"]
    assert datamodule.datasets["train"].shared_epoch.get() == 1  # second epoch (0-based)
    assert {split: c["total"] for split, c in datamodule.skipped().items()} == {"train": 0, "val": 0, "test": 0}


def test_validation_is_capped_and_test_reads_the_whole_split(trained):
    val = trained["after_fit"]["val"]
    assert val["stage"] == "val" and val["metrics"]["n"] == 4
    test = trained["module"].last_eval
    assert test["stage"] == "test" and test["metrics"]["n"] == N_TEST
    assert 0.0 <= test["metrics"]["exact_match"] <= 1.0
    assert any(k.startswith("exact_match_") for k in test["metrics"])
    assert {"prompt", "response", "prediction", "__key__"} <= set(test["samples"][0])


def test_checkpoint_holds_only_trainable_weights_and_the_lm_identity(trained):
    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and not [k for k in keys if k.startswith(("lm.", "model.lm."))]
    assert set(keys) == {f"model.{k}" for k in trained["module"].model.trainable_state_dict()}
    assert ckpt["lm_identity"] == trained["module"].lm_identity


def test_resume_restores_the_trainable_weights_exactly(trained, tiny_lm_dir, shapes_dir, tmp_path):
    fresh = make_module(tiny_lm_dir, seed=1)
    saved = trainable(trained["module"])
    assert not all(torch.equal(v, saved[k]) for k, v in trainable(fresh).items())
    trainer = make_trainer(tmp_path)  # max_steps already reached: restores, takes no step
    trainer.fit(fresh, datamodule=make_datamodule(shapes_dir), ckpt_path=trained["ckpt"])
    assert trainer.global_step == 4
    restored = trainable(fresh)
    assert all(torch.equal(restored[k], saved[k]) for k in saved)


def test_checkpoint_of_another_lm_is_refused(trained, tiny_lm_dir, shapes_dir, tmp_path):
    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=False)
    ckpt["lm_identity"] = {"source": "/elsewhere/other-lm", "sha256": "f" * 64}
    bad = tmp_path / "other-lm.ckpt"
    torch.save(ckpt, bad)
    module = trained["module"]
    with pytest.raises(ValueError, match=r"/elsewhere/other-lm.*ffffffffffff.*" + module.lm_identity["sha256"][:12]):
        make_trainer(tmp_path).validate(module, datamodule=make_datamodule(shapes_dir), ckpt_path=bad, verbose=False)


def test_checkpoint_missing_a_key_is_refused(trained):
    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=False)
    dropped = sorted(ckpt["state_dict"])[0]
    del ckpt["state_dict"][dropped]
    with pytest.raises(ValueError, match=dropped.replace(".", r"\.")):
        trained["module"].on_load_checkpoint(ckpt)


def test_datamodule_refuses_an_image_size_the_encoder_does_not_take(tiny_lm_dir, shapes_dir, trained):
    from mm_llama.training.datamodule import model_inputs

    datamodule = ImageDataModule(data_dir=str(shapes_dir), image_size=32)
    with pytest.raises(ValueError, match="image_size=32.*16x16"):
        datamodule.connect(model_inputs(trained["module"]))


def test_evaluation_loaders_batch_eval_batch_size_and_training_keeps_batch_size(shapes_dir, trained):
    from mm_llama.training.datamodule import model_inputs

    datamodule = ImageDataModule(data_dir=str(shapes_dir), batch_size=2, eval_batch_size=5, num_workers=0,
                                 val_samples=None, shuffle_buffer=0)
    datamodule.connect(model_inputs(trained["module"]))
    datamodule.setup("fit")
    datamodule.setup("test")
    assert {len(b["input_ids"]) for b in datamodule.train_dataloader()} == {2}
    assert [len(b["input_ids"]) for b in datamodule.val_dataloader()] == [5, 3]  # the 8 validation samples
    assert [len(b["input_ids"]) for b in datamodule.test_dataloader()] == [5, 3]
    default = ImageDataModule(data_dir=str(shapes_dir), batch_size=3, num_workers=0)
    default.connect(model_inputs(trained["module"]))
    default.setup("test")
    assert [len(b["input_ids"]) for b in default.test_dataloader()] == [3, 3, 2]  # None: the training batch
    with pytest.raises(ValueError, match="eval_batch_size must be None or >= 1, got 0"):
        ImageDataModule(data_dir=str(shapes_dir), eval_batch_size=0)
    with pytest.raises(ValueError, match="RunConfig.eval_batch_size must be >= 1"):
        run_module.RunConfig(eval_batch_size=0)


@pytest.mark.parametrize("eval_batch_size, workers, cap, rank", [
    (5, 0, None, None), (3, 0, None, None), (3, 2, None, None), (3, 2, 3, None), (2, 0, 3, 1), (3, 0, None, 1),
])
def test_eval_batches_counts_the_batches_the_loader_gives(shapes_dir, trained, monkeypatch, eval_batch_size,
                                                          workers, cap, rank):
    """The progress bar's total for a WebDataset split (no length) is what the loader then yields,
    with workers, a sample cap, and as rank 1 of 2 (the test split: 2 shards of 4 samples)."""
    from mm_llama.training.datamodule import model_inputs

    if rank is not None:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
    datamodule = ImageDataModule(data_dir=str(shapes_dir), batch_size=2, eval_batch_size=eval_batch_size,
                                 num_workers=workers, test_samples=cap)
    datamodule.connect(model_inputs(trained["module"]))
    datamodule.setup("test")
    batches = sum(1 for _ in datamodule.test_dataloader())
    assert datamodule.eval_batches("test") == batches > 0
    given = ImageDataModule(data_dir=str(shapes_dir), test_urls=default_shard_urls(shapes_dir)["test"])
    assert given.eval_batches("test") is None  # URLs of unknown size: Lightning's "--"


def test_default_urls_come_from_the_manifest(shapes_dir, tmp_path):
    assert default_shard_urls(shapes_dir)["test"].endswith("test-{000000..000001}.tar")
    with pytest.raises(FileNotFoundError, match="make-shards"):
        default_shard_urls(tmp_path)


# --------------------------------------------------------------------------- train_adapter.py


@pytest.fixture
def tiny_image_modality(monkeypatch):
    """``--modality image`` with the tiny model config (the CLI has no flag for every encoder field)."""
    spec = run_module.MODALITIES["image"]
    tiny = modalities.Modality(lambda cfg: TINY_MODEL, spec.datamodule, spec.data_dir, spec.out)
    monkeypatch.setitem(run_module.MODALITIES, "image", tiny)


def test_train_adapter_writes_every_artefact_and_resumes(tiny_lm_dir, shapes_dir, tmp_path, capsys,
                                                         tiny_image_modality):
    out = tmp_path / "run"
    flags = ["--modality", "image", "--lm", str(tiny_lm_dir), "--data-dir", str(shapes_dir), "--out", str(out),
             "--batch-size", "4", "--num-workers", "0", "--val-every", "1", "--val-samples", "4", "--no-progress",
             "--encoder-pretrain-steps", "0",  # stage 1: tests/test_encoder_pretrain.py
             "--task-weights", "count=0.5"]
    assert run_module.main([*flags, "--steps", "2"]) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    metrics = json.loads(last_line)
    assert metrics == json.loads((out / "metrics.json").read_text())
    assert REQUIRED_METRICS <= set(metrics)
    assert any(k.startswith("exact_match_") and k != "exact_match_heldout_combos" for k in metrics)
    assert metrics["steps"] == 2 and metrics["test_samples"] == N_TEST
    assert metrics["lm"]["source"] == str(tiny_lm_dir) and len(metrics["lm"]["sha256"]) == 64
    assert metrics["skipped"]["train"]["total"] == 0 and metrics["trainable_params"] > 0
    assert metrics["shard_retries"] == {"train": 0, "val": 0, "test": 0}
    for name in ("adapter.ckpt", "last.ckpt", "config.yaml", "training_curve.png", "samples.png"):
        assert (out / name).is_file(), name
    predictions = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == N_TEST  # every test sample, judged as metrics.json counts it
    assert sum(p["correct"] for p in predictions) / N_TEST == pytest.approx(metrics["exact_match"])
    assert {"prompt", "response", "prediction", "task", "heldout", "__key__"} <= set(predictions[0])
    adapter = torch.load(out / "adapter.ckpt", map_location="cpu", weights_only=False)
    assert "optimizer_states" not in adapter and "lm_identity" in adapter
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave no temporary file
    from mm_llama.training.checkpoint_io import CLASS_PATH

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["trainer"]["plugins"] == [{"class_path": CLASS_PATH}]
    assert config["data"]["init_args"]["task_weights"] == {"count": 0.5}  # stage 2's training mix, as run

    # the resolved config is a valid LightningCLI config
    from mm_llama.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(out / "config.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    assert f"lm: {tiny_lm_dir}" in capsys.readouterr().out

    assert "activation_checkpointing" not in config["model"]

    # Resuming with --activation-checkpointing: the same weights, recomputed blocks, and a config that says so.
    assert run_module.main([*flags, "--steps", "3", "--resume", "--activation-checkpointing"]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["steps"] == 3 and resumed["resumed_from"] == str(out / "last.ckpt")
    history = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)["callbacks"]["TrainingHistory"]
    assert [step for step, _ in history["train_loss"]] == [1, 2, 3]  # the curve survives the resume
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["activation_checkpointing"] == 1
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(out / "config.yaml"), "--print_config"])
    assert exit_info.value.code == 0 and "activation_checkpointing: 1" in capsys.readouterr().out


def test_activation_checkpointing_flag_takes_an_optional_block_interval(capsys):
    parse = run_module.build_parser().parse_args
    assert parse([]).activation_checkpointing == 0
    assert parse(["--activation-checkpointing"]).activation_checkpointing == 1
    assert parse(["--activation-checkpointing", "3"]).activation_checkpointing == 3
    with pytest.raises(ValueError, match="--activation-checkpointing takes a block interval >= 1"):
        run_module.RunConfig(activation_checkpointing=-1)


def test_task_weights_flag(capsys):
    parse = run_module.parse_task_weights
    assert parse("count=0.25") == {"count": 0.25}
    assert parse(" count=0.25, caption=1 ") == {"count": 0.25, "caption": 1.0}
    assert parse("all") == {}
    default = run_module.MODALITIES["image"].task_weights
    assert run_module.RunConfig().task_weights == default  # the modality's mix unless given
    assert run_module.RunConfig(task_weights={}).task_weights == {}
    for bad in ("count", "count=2", "count=half", "=0.5", ","):
        with pytest.raises(SystemExit):
            run_module.build_parser().parse_args(["--task-weights", bad])
        assert "--task-weights" in capsys.readouterr().err
    with pytest.raises(ValueError, match="speech shards have none"):
        run_module.RunConfig(modality="speech", task_weights={"count": 0.5})
    with pytest.raises(ValueError, match=r"RunConfig.task_weights\['count'\] is a keep probability"):
        run_module.RunConfig(task_weights={"count": -1})


def test_unknown_modality_says_so(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_module.main(["--modality", "smell"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown modality 'smell'" in err and "image, video, speech" in err


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_precision_is_bf16_only_for_image_on_a_cpu_with_native_bf16(monkeypatch, native_bf16):
    monkeypatch.setattr(run_module.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(run_config, "cpu_has_native_bf16", lambda: native_bf16)
    assert run_module.RunConfig().trainer_precision() == ("bf16-mixed" if native_bf16 else "32-true")
    for modality in ("video", "speech"):  # not measured in bf16 on a CPU: fp32
        assert run_module.RunConfig(modality=modality).trainer_precision() == "32-true"
    for explicit in ("32-true", "bf16-mixed"):
        cfg = run_module.RunConfig(modality="speech", precision=explicit)
        assert cfg.trainer_precision() == explicit == cfg.trainer_defaults()["precision"]
    with pytest.raises(ValueError, match="RunConfig.precision must be one of"):
        run_module.RunConfig(precision="16-mixed")


def test_bf16_run_holds_the_frozen_lm_in_bf16_and_never_changes_it(tiny_lm_dir, shapes_dir, tmp_path, capsys,
                                                                   monkeypatch, tiny_image_modality):
    seen = {}

    class Recording(AdapterModule):
        def on_fit_start(self):
            super().on_fit_start()
            seen["start"] = (self.model.lm.embed_tokens.weight.dtype, parameters_digest(self.model.lm))

        def on_fit_end(self):
            seen["end"] = parameters_digest(self.model.lm)
            seen["trainable"] = {p.dtype for p in self.parameters() if p.requires_grad}

    monkeypatch.setattr(run_module, "AdapterModule", Recording)
    out = tmp_path / "bf16"
    assert run_module.main(["--modality", "image", "--lm", str(tiny_lm_dir), "--data-dir", str(shapes_dir),
                            "--out", str(out), "--batch-size", "4", "--num-workers", "0", "--val-samples", "4",
                            "--no-progress", "--encoder-pretrain-steps", "2", "--steps", "2",
                            "--precision", "bf16-mixed"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["precision"] == "bf16-mixed" and metrics["steps"] == 2
    dtype, before = seen["start"]
    assert dtype == torch.bfloat16 and seen["end"] == before  # frozen means frozen, in bf16 too
    assert seen["trainable"] == {torch.float32}  # fp32 master weights under autocast
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"]["lm_dtype"] == "bfloat16" and config["trainer"]["precision"] == "bf16-mixed"


def test_gradient_accumulation_steps_once_per_k_batches_and_logs_their_mean_loss(
        tiny_lm_dir, shapes_dir, tmp_path, capsys, monkeypatch, tiny_image_modality):
    losses, steps_seen = [], []

    class Recording(AdapterModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            losses.append(float(loss))
            steps_seen.append(self.trainer.global_step)
            return loss

    monkeypatch.setattr(run_module, "AdapterModule", Recording)
    out = tmp_path / "accumulate"
    assert run_module.main(["--modality", "image", "--lm", str(tiny_lm_dir), "--data-dir", str(shapes_dir),
                            "--out", str(out), "--batch-size", "2", "--num-workers", "0", "--val-samples", "4",
                            "--no-progress", "--encoder-pretrain-steps", "0", "--steps", "2", "--val-every", "1",
                            "--accumulate-grad-batches", "3"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["steps"] == 2
    assert steps_seen == [0, 0, 0, 1, 1, 1]  # three batches a step, two optimizer steps
    history = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)["callbacks"]["TrainingHistory"]
    assert [step for step, _ in history["train_loss"]] == [1, 2]
    for (_, logged), batches in zip(history["train_loss"], (losses[:3], losses[3:])):
        assert logged == pytest.approx(sum(batches) / 3, rel=1e-5)  # the step's mean, not its last batch
    assert [step for step, _ in history["val"]] == [1, 2]  # --val-every counts optimizer steps
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["trainer"]["accumulate_grad_batches"] == 3 and config["trainer"]["val_check_interval"] == 3

    # Resumed from the step boundary it was saved at: one more step of three batches.
    losses.clear()
    steps_seen.clear()
    assert run_module.main(["--modality", "image", "--lm", str(tiny_lm_dir), "--data-dir", str(shapes_dir),
                            "--out", str(out), "--batch-size", "2", "--num-workers", "0", "--val-samples", "4",
                            "--no-progress", "--encoder-pretrain-steps", "0", "--steps", "3", "--val-every", "1",
                            "--accumulate-grad-batches", "3", "--resume"]) == 0
    assert steps_seen == [2, 2, 2]
    history = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)["callbacks"]["TrainingHistory"]
    assert [step for step, _ in history["train_loss"]] == [1, 2, 3]
    assert history["train_loss"][-1][1] == pytest.approx(sum(losses) / 3, rel=1e-5)
    with pytest.raises(ValueError, match="RunConfig.accumulate_grad_batches must be >= 1"):
        run_module.RunConfig(accumulate_grad_batches=0)


@pytest.mark.parametrize("cores, workers", [(1, 0), (2, 0), (None, 0), (4, 2), (64, 2)])
def test_loader_workers_follow_the_core_count(monkeypatch, cores, workers):
    monkeypatch.setattr(run_config.os, "cpu_count", lambda: cores)
    assert run_config.default_num_workers() == workers
    assert run_module.RunConfig().num_workers == workers


@pytest.mark.parametrize("modality", ["image", "video", "speech"])
@pytest.mark.parametrize("progress", [True, False])
def test_no_progress_reaches_the_shard_generators(monkeypatch, tmp_path, modality, progress):
    """``--no-progress`` also silences the bars of the built-in shard generators."""
    from mm_llama.data import spoken
    from mm_llama.training import datamodule

    calls = []
    monkeypatch.setattr(datamodule, "ensure_default_shards", lambda *a, **kw: calls.append(kw["progress"]))
    monkeypatch.setattr(spoken, "make_default_shards", lambda *a, **kw: calls.append(kw["progress"]))
    cfg = run_module.RunConfig(modality=modality, data_dir=str(tmp_path), progress=progress)
    cfg.spec.datamodule(cfg).prepare_data()
    assert calls == [progress]


def test_sample_grid_writes_control_bytes_as_escapes(tmp_path):
    """An untrained model's answer can be control bytes; the grid shows them as ``\\x13``, which the
    font can draw, instead of empty boxes and a matplotlib warning per missing glyph."""
    from mm_llama.training.report import _wrap, plot_samples

    sample = {"image": torch.rand(8, 8, 3), "prompt": "what colour?", "prediction": "red\x13\x07", "response": "red"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing glyph is a UserWarning
        path = plot_samples([sample], tmp_path / "grid.png")
    assert path.stat().st_size > 1000
    assert _wrap("red\x13\x07  ok\n") == r"red\x13\x07 ok"
