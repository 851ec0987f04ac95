"""``mm-llama``: the shipped config validates, bad keys are named, subcommands dispatch,
and a tiny ``fit`` / ``test`` / ``predict`` runs through LightningCLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mm_llama.checkpoint_files import CorruptCheckpointError
from mm_llama.cli import main
from mm_llama.data.pipeline import resolve_urls

REPO = Path(__file__).resolve().parents[1]
IMAGE_CONFIG = REPO / "configs" / "image.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


@pytest.fixture(autouse=True)
def _bare_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["mm-llama"])  # LightningCLI warns when args and sys.argv both carry options


def exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


def test_image_config_validates(capsys):
    assert exit_code(["fit", "--config", str(IMAGE_CONFIG), "--print_config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["lm"] == "smollm2-135m-instruct"
    assert config["model"]["optim"]["total_steps"] == config["trainer"]["max_steps"]
    assert isinstance(config["trainer"]["val_check_interval"], int)
    checkpoint = config["trainer"]["callbacks"][0]
    assert checkpoint["class_path"].endswith("ModelCheckpoint")
    assert checkpoint["init_args"]["save_last"] is True
    assert checkpoint["init_args"]["dirpath"] == "runs/image-cli/checkpoints"
    assert config["trainer"]["logger"]["class_path"].endswith("CSVLogger")
    assert config["trainer"]["precision"] == ("bf16-mixed" if torch.cuda.is_available() else "32-true")
    # the CLI's image model is train_adapter.py's
    from mm_llama.training.modalities import image_model_config
    from mm_llama.training.run_config import RunConfig

    default = image_model_config(RunConfig(modality="image"))
    assert config["model"]["model"]["cross_attention"]["hidden_dim"] == default.cross_attention.hidden_dim == 512
    assert config["model"]["model"]["image_encoder"]["patch_size"] == default.image_encoder.patch_size
    assert config["data"]["init_args"]["task_weights"] == RunConfig(modality="image").task_weights == {"count": 0.25}  # stage 2's mix


@pytest.mark.parametrize(("old", "new", "key"), [
    ("  max_len: 128", "  max_lenn: 128", "max_lenn"),
    ("    warmup_steps: 20", "    warmup_stepz: 20", "warmup_stepz"),
    ("      depth: 4", "      dept: 4", "dept"),
])  # fmt: skip
def test_misspelled_config_key_is_named(tmp_path, capsys, old, new, key):
    text = IMAGE_CONFIG.read_text()
    assert old in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(old, new))
    assert exit_code(["fit", "--config", str(bad), "--print_config"]) == 2
    assert key in capsys.readouterr().err


def test_unknown_subcommand_lists_the_known_ones(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "'trian'" in err and all(name in err for name in ("fit", "validate", "test", "predict", "make-shards"))


def test_help_and_no_arguments(capsys):
    assert main(["--help"]) == 0
    assert "make-shards" in capsys.readouterr().out
    assert main([]) == 2


def test_make_shards(tmp_path, capsys):
    out = tmp_path / "shapes"
    argv = ["make-shards", "--out", str(out), "--n-train", "6", "--n-val", "2", "--n-test", "2",
            "--samples-per-shard", "3", "--image-size", "16"]
    assert main(argv) == 0
    urls = json.loads(capsys.readouterr().out)
    assert set(urls) == {"train", "val", "test"}
    assert sorted(out.glob("train-*.tar")) == [Path(u) for u in resolve_urls(urls["train"])]
    assert (out / "manifest.json").is_file()


def test_tiny_fit_test_predict(tiny_lm_dir, tmp_path):
    from mm_llama.data.scenes import make_default_shards

    data_dir = tmp_path / "shapes"
    make_default_shards(data_dir, image_size=16, n_train=16, n_val=4, n_test=4, samples_per_shard=8,
                        min_shards=2, progress=False)
    config = yaml.safe_load(IMAGE_CONFIG.read_text())
    run_dir = tmp_path / "run"
    config["trainer"].update(max_steps=2, val_check_interval=2, limit_val_batches=1, enable_progress_bar=False,
                             enable_model_summary=False, accelerator="cpu")
    config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(run_dir / "checkpoints")
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(run_dir)
    config["model"].update(lm=str(tiny_lm_dir), eval_max_new_tokens=3, system_prompt="Answer briefly.")
    config["model"]["model"]["image_encoder"].update(backbone="timm:vit_tiny_patch16_224", image_size=16, patch_size=8,
                                                     depth=2, width=32, heads=2, intermediate_layers=[0])
    config["model"]["model"]["cross_attention"]["every"] = 2
    config["model"]["optim"]["total_steps"] = 2
    config["data"].update(data_dir=str(data_dir), batch_size=2, num_workers=0, val_samples=2)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))

    assert main(["fit", "--config", str(path)]) == 0
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file() and list(last.parent.glob("best-*.ckpt"))
    saved = yaml.safe_load((last.parent / "config.yaml").read_text())  # beside the checkpoints
    # data.system_prompt is linked to the model's (the data module refuses a mismatch), so not saved twice
    assert saved["model"]["system_prompt"] == "Answer briefly." and "system_prompt" not in saved["data"]
    assert main(["test", "--config", str(path), "--ckpt_path", str(last)]) == 0
    assert main(["predict", "--config", str(path), "--ckpt_path", str(last)]) == 0
    # checkpoints go through AtomicCheckpointIO: a truncated one is refused, named
    assert saved["trainer"]["plugins"] == [{"class_path": "mm_llama.training.checkpoint_io.AtomicCheckpointIO"}]
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(CorruptCheckpointError, match=f"checkpoint {cut} cannot be read"):
        main(["test", "--config", str(path), "--ckpt_path", str(cut)])
