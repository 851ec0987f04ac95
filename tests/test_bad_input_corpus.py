"""The bad-input corpus: every kind of broken sample we know of, mixed into real shards of the
built-in scenes, goes through a real Lightning training epoch. Training completes, every broken
sample is counted under its kind, and every good sample (odd-but-valid ones included) reaches a
training batch exactly once.

Each entry of :data:`BROKEN` / :data:`ODD_BUT_VALID` is one kind of damage; new modalities add
theirs here.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from encoders import ImageEncoderConfig
from mm_llama.data import scenes
from mm_llama.model import CrossAttentionConfig, ModelConfig
from mm_llama.training.datamodule import ImageDataModule
from mm_llama.training.module import AdapterModule
from mm_llama.training.optim import OptimConfig

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE_SIZE = 16
MAX_PIXELS = 1_000_000
Sample = dict[str, object]


@dataclass(frozen=True)
class Damage:
    """One kind of broken (or odd but valid) sample, made from a real good one."""

    name: str
    make: Callable[[Sample], Sample]
    kind: str | None  # the skip kind it must be counted under; None = must be trained on


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _with(sample: Sample, **entries) -> Sample:
    out = {k: v for k, v in sample.items() if k not in ("png", "json")}
    out.update({k: v for k, v in entries.items() if v is not None})
    return out


def _meta(sample: Sample, **fields) -> bytes:
    return json.dumps({**json.loads(sample["json"]), **fields}).encode()


BROKEN: list[Damage] = [
    Damage("truncated_png", lambda s: _with(s, png=s["png"][: len(s["png"]) // 2], json=s["json"]), "bad_image"),
    Damage("zero_byte_image", lambda s: _with(s, png=b"", json=s["json"]), "bad_image"),
    Damage("not_an_image", lambda s: _with(s, jpg=b"GIF? no: just text", json=s["json"]), "bad_image"),
    Damage("decompression_bomb", lambda s: _with(s, png=_png(Image.new("1", (1100, 1000))), json=s["json"]),
           "image_too_large"),
    Damage("unsupported_image_type", lambda s: _with(s, bmp=s["png"], json=s["json"]), "missing_image"),
    Damage("no_text", lambda s: _with(s, png=s["png"]), "missing_text"),
    Damage("broken_json", lambda s: _with(s, png=s["png"], json=s["json"][:20]), "bad_json"),
    Damage("json_not_object", lambda s: _with(s, png=s["png"], json=b'["a red square"]'), "bad_json"),
    Damage("response_not_string", lambda s: _with(s, png=s["png"], json=_meta(s, response=3)), "bad_json"),
    Damage("latin1_caption", lambda s: _with(s, png=s["png"], txt="un carr\xe9 rouge".encode("latin-1")),
           "bad_encoding"),
    Damage("empty_caption", lambda s: _with(s, png=s["png"], json=_meta(s, response="")), "empty_text"),
    Damage("whitespace_prompt", lambda s: _with(s, png=s["png"], json=_meta(s, prompt=" \n\t")), "empty_text"),
    Damage("placeholder_in_prompt", lambda s: _with(s, png=s["png"], json=_meta(s, prompt="Is <|image|> red?")),
           "bad_text"),
    Damage("too_long", lambda s: _with(s, png=s["png"], json=_meta(s, response="red " * 200)), "too_long"),
]
"""Broken samples: each must be skipped and counted under ``kind``."""


def _recolour(s: Sample, mode: str, fmt: str = "PNG") -> bytes:
    return _png(Image.open(io.BytesIO(s["png"])).convert(mode), fmt)


def _sixteen_bit(s: Sample) -> bytes:
    grey = np.asarray(Image.open(io.BytesIO(s["png"])).convert("L")).astype(np.uint16) * 257
    return _png(Image.fromarray(grey))


ODD_BUT_VALID: list[Damage] = [
    Damage("greyscale", lambda s: _with(s, png=_recolour(s, "L"), json=s["json"]), None),
    Damage("rgba", lambda s: _with(s, png=_recolour(s, "RGBA"), json=s["json"]), None),
    Damage("palette", lambda s: _with(s, png=_recolour(s, "P"), json=s["json"]), None),
    Damage("cmyk_jpeg", lambda s: _with(s, jpg=_recolour(s, "CMYK", "JPEG"), json=s["json"]), None),
    Damage("sixteen_bit", lambda s: _with(s, png=_sixteen_bit(s), json=s["json"]), None),
    Damage("one_pixel", lambda s: _with(s, png=_png(Image.new("RGB", (1, 1), (255, 0, 0))), json=s["json"]), None),
    Damage("sliver_3x200", lambda s: _with(s, png=_png(Image.new("RGB", (3, 200), (0, 0, 255))), json=s["json"]),
           None),
    Damage("png_bytes_as_jpg", lambda s: _with(s, jpg=s["png"], json=s["json"]), None),
    Damage("txt_caption", lambda s: _with(s, png=s["png"], txt=json.loads(s["json"])["response"].encode()), None),
    Damage("unicode_caption", lambda s: _with(s, png=s["png"], json=_meta(s, response="A red square — café ☕.")),
           None),
]
"""Unusual samples that are valid: each must be converted and trained on, never skipped."""

BROKEN_SHARDS = {
    "truncated_shard": "read_error",  # cut inside a member: its earlier samples still count
    "not_a_tar": "read_error",
    "failing_pipe": "read_error",  # a pipe: command that exits non-zero (as a 404 through curl does)
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Train shards mixing real samples with :data:`BROKEN` and :data:`ODD_BUT_VALID`, plus broken shards.

    Returns ``(train_urls, good_keys, expected_counts, data_dir)``.
    """
    root = tmp_path_factory.mktemp("corpus")
    scenes.make_default_shards(root / "shapes", image_size=IMAGE_SIZE, n_train=8, n_val=4, n_test=4,
                               samples_per_shard=4, min_shards=1, progress=False)
    real = [scenes.make_sample(7, "train", i, image_size=IMAGE_SIZE) for i in range(40)]
    samples, good = [], set()
    for i, damage in enumerate(BROKEN + ODD_BUT_VALID):
        samples.append({**damage.make(real[i]), "__key__": f"{damage.name}"})
        if damage.kind is None:
            good.add(damage.name)
    for s in real[len(samples) :]:
        samples.append({**s, "__key__": f"good_{s['__key__']}"})
        good.add(f"good_{s['__key__']}")
    order = np.random.default_rng(0).permutation(len(samples))
    urls = []
    for shard in range(3):
        path = root / f"mixed-{shard:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for j in order[shard::3]:
                sink.write(samples[j])
        urls.append(str(path))

    # A shard cut inside its third member's data: the first sample survives, the cut one is lost
    # with the shard's read_error; the samples after the cut were never there.
    whole = root / "whole.tar"
    kept = [{**s, "__key__": f"before_cut_{k}"} for k, s in enumerate(real[:1])]
    with wds.TarWriter(str(whole)) as sink:
        for s in kept + [{**s, "__key__": f"cut_{k}"} for k, s in enumerate(real[1:3])]:
            sink.write(s)
    with tarfile.open(whole) as tar:
        third = tar.getmembers()[2]  # the first entry of the first cut sample
    (root / "truncated-000000.tar").write_bytes(whole.read_bytes()[: third.offset_data + third.size // 2])
    urls.append(str(root / "truncated-000000.tar"))
    good |= {s["__key__"] for s in kept}

    (root / "garbage-000000.tar").write_bytes(b"this is not a tar file\n" * 100)
    urls.append(str(root / "garbage-000000.tar"))
    urls.append(f"pipe:cat {root / 'no-such-shard.tar'}")

    expected = Counter(d.kind for d in BROKEN) + Counter(BROKEN_SHARDS.values())
    return "::".join(urls), good, dict(expected), root / "shapes"


class RecordKeys(L.Callback):
    """Keys of every sample in every training batch."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.keys += [m["__key__"] for m in batch["meta"]]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_corpus_covers_at_least_twelve_kinds_of_damage():
    assert len(BROKEN) + len(BROKEN_SHARDS) >= 12
    assert len({d.name for d in BROKEN + ODD_BUT_VALID}) == len(BROKEN) + len(ODD_BUT_VALID)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_training_over_the_corpus_counts_every_broken_sample_and_loses_no_good_one(
    corpus, tiny_lm_dir, tmp_path, num_workers
):
    train_urls, good, expected, data_dir = corpus
    model = ModelConfig(
        image_encoder=ImageEncoderConfig(backbone="timm:vit_tiny_patch16_224", image_size=IMAGE_SIZE, patch_size=8,
                                         depth=1, width=32, heads=2, intermediate_layers=()),
        cross_attention=CrossAttentionConfig(every=2),
    )
    torch.manual_seed(0)
    module = AdapterModule(lm=str(tiny_lm_dir), model=model, eval_max_new_tokens=2,
                           optim=OptimConfig(lr=1e-3, warmup_steps=0, total_steps=20))
    data = ImageDataModule(data_dir=str(data_dir), train_urls=train_urls, batch_size=4, num_workers=num_workers,
                           shuffle_buffer=8, max_len=64, max_image_pixels=MAX_PIXELS)
    record = RecordKeys()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[record], default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=data)

    assert trainer.state.finished and trainer.global_step == len(record.losses) > 0
    assert all(math.isfinite(x) for x in record.losses)
    assert sorted(record.keys) == sorted(good), "good samples lost or repeated"
    skipped = data.skipped()["train"]
    assert skipped == {"total": sum(expected.values()), **expected}
