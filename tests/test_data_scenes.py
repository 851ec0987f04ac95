"""The built-in shapes dataset: determinism, held-out combinations, targets, shard bookkeeping."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import braceexpand
import pytest
from PIL import Image

from mm_llama.data import scenes

N = {"train": 400, "val": 40, "test": 200}


def read_split(url: str) -> list[dict]:
    """Samples of all shards named by a brace pattern, read with plain ``tarfile``."""
    samples: dict[str, dict] = {}
    for path in braceexpand.braceexpand(url):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return list(samples.values())


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict[str, str], dict[str, list[dict]]]:
    root = tmp_path_factory.mktemp("shapes")
    urls = scenes.make_default_shards(
        root, n_train=N["train"], n_val=N["val"], n_test=N["test"], samples_per_shard=100, progress=False
    )
    return root, urls, {split: read_split(url) for split, url in urls.items()}


def metas(samples: list[dict]) -> list[dict]:
    return [json.loads(s["json"]) for s in samples]


def test_same_seed_same_bytes(tmp_path):
    a = scenes.write_shards(tmp_path / "a", "train", 30, 16, seed=3, progress=False)
    b = scenes.write_shards(tmp_path / "b", "train", 30, 16, seed=3, progress=False)
    c = scenes.write_shards(tmp_path / "c", "train", 30, 16, seed=4, progress=False)
    assert [p.name for p in a] == ["train-000000.tar", "train-000001.tar"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert [p.read_bytes() for p in a] != [p.read_bytes() for p in c]
    # A sample depends on (seed, split, index) only, not on the shard layout.
    assert scenes.make_sample(3, "train", 20) == read_split(str(a[1]))[4]
    assert scenes.make_sample(3, "train", 5) != scenes.make_sample(3, "test", 5)


def test_counts_keys_and_images(shards):
    root, urls, data = shards
    assert urls["train"] == str(root / "train-{000000..000003}.tar")
    assert urls["val"] == str(root / "val-{000000..000003}.tar")  # small splits still get 4 shards
    for split, samples in data.items():
        keys = [s["__key__"] for s in samples]
        assert len(keys) == N[split] and len(set(keys)) == N[split]
        assert all("." not in k for k in keys)
        assert all(set(s) == {"__key__", "png", "json"} for s in samples)
    image = Image.open(io.BytesIO(data["train"][0]["png"]))
    assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
    manifest = json.loads((root / scenes.MANIFEST).read_text())
    assert {s: manifest["splits"][s]["n_samples"] for s in scenes.SPLITS} == N


def test_heldout_combinations(shards):
    _, _, data = shards
    for split in ("train", "val"):
        for meta in metas(data[split]):
            assert not meta["heldout"]
            assert all((o["colour"], o["shape"]) not in scenes.HELDOUT_COMBOS for o in meta["objects"])
    test = metas(data["test"])
    for meta in test:
        assert meta["heldout"] == any((o["colour"], o["shape"]) in scenes.HELDOUT_COMBOS for o in meta["objects"])
    seen = {(o["colour"], o["shape"]) for m in test for o in m["objects"]}
    assert scenes.HELDOUT_COMBOS <= seen
    assert 0.3 < sum(m["heldout"] for m in test) / len(test) < 0.8


def test_variety(shards):
    _, _, data = shards
    train = metas(data["train"])
    assert {m["task"] for m in train} == set(scenes.TASKS)
    assert len({o["colour"] for m in train for o in m["objects"]}) >= 6
    assert len({o["shape"] for m in train for o in m["objects"]}) >= 4
    assert {len(m["objects"]) for m in train} == {1, 2}  # the default SceneSpec: 1-2 objects on 2x2
    assert {o["position"] for m in train for o in m["objects"]} == set(scenes.POSITION_NAMES[2])
    assert len({m["response"] for m in train if m["task"] == "caption"}) > 50


def test_targets_match_objects(shards):
    _, _, data = shards
    for meta in metas(data["train"]) + metas(data["test"]):
        objects = meta["objects"]
        assert len({o["position"] for o in objects}) == len(objects)
        assert len({(o["colour"], o["shape"]) for o in objects}) == len(objects)
        assert [(o["row"], o["col"]) for o in objects] == sorted((o["row"], o["col"]) for o in objects)
        task, prompt, response = meta["task"], meta["prompt"], meta["response"]
        if task == "count":
            assert prompt == "How many shapes are there?"
            assert response == ["one", "two", "three"][len(objects) - 1]
        elif task == "colour":
            (obj,) = [o for o in objects if prompt == f"What colour is the shape in the {o['position']}?"]
            assert response == obj["colour"]
        elif task == "where":
            (obj,) = [o for o in objects if prompt == f"Where is the {o['colour']} {o['shape']}?"]
            assert response == obj["position"]
        else:
            assert prompt == "Describe the image."
            for o in objects:
                assert f"{o['colour']} {o['shape']} in the {o['position']}" in response
            assert response[0].isupper() and response.endswith(".")


def test_three_by_three_spec():
    spec = scenes.SceneSpec(grid=3, max_objects=3)
    metas_ = [json.loads(scenes.make_sample(0, "train", i, image_size=32, spec=spec)["json"]) for i in range(120)]
    assert {len(m["objects"]) for m in metas_} == {1, 2, 3}
    assert {o["position"] for m in metas_ for o in m["objects"]} == set(scenes.POSITIONS)
    assert all(0 <= o["row"] < 3 and 0 <= o["col"] < 3 for m in metas_ for o in m["objects"])
    # Same (seed, split, index), other layout: another sample.
    assert scenes.make_sample(0, "train", 0, spec=spec) != scenes.make_sample(0, "train", 0)


@pytest.mark.parametrize("grid, max_objects", [(4, 1), (2, 0), (2, 5), (3, 4)])
def test_bad_scene_spec_is_refused(grid, max_objects):
    with pytest.raises(ValueError, match="grid|max_objects"):
        scenes.SceneSpec(grid, max_objects)


def test_objects_are_drawn_in_their_cell():
    """The centre of mass of each object's pixels lies in the cell its position names."""
    for grid in (2, 3):
        for col in range(grid):
            obj = scenes.SceneObject("white", "square", grid - 1, col, 0.7, 0.0, 0.0, grid=grid)
            pixels = [(x, y) for (x, y) in _lit(scenes.render_scene([obj], 60))]
            cx = sum(x for x, _ in pixels) / len(pixels)
            cy = sum(y for _, y in pixels) / len(pixels)
            assert int(cx // (60 / grid)) == col and int(cy // (60 / grid)) == grid - 1


def _lit(image: Image.Image):
    rgb = image.convert("L")
    return [(x, y) for y in range(rgb.height) for x in range(rgb.width) if rgb.getpixel((x, y)) > 128]


def test_caption_wording():
    def obj(colour, shape, row, col, grid=3):
        return scenes.SceneObject(colour, shape, row, col, 0.7, 0.0, 0.0, grid=grid)

    assert scenes.caption([obj("red", "square", 0, 0)]) == "A red square in the top left."
    assert (
        scenes.caption([obj("red", "square", 0, 1, grid=2), obj("blue", "circle", 1, 1, grid=2)])
        == "A red square in the top right and a blue circle in the bottom right."
    )
    assert (
        scenes.caption([obj("blue", "circle", 1, 1), obj("orange", "star", 0, 2), obj("red", "square", 2, 0)])
        == "An orange star in the top right, a blue circle in the center and a red square in the bottom left."
    )


def test_manifest_reuse_and_regeneration(tmp_path):
    kwargs = dict(n_train=40, n_val=8, n_test=8, samples_per_shard=5, progress=False)
    urls = scenes.make_default_shards(tmp_path, **kwargs)
    shard = tmp_path / "train-000001.tar"
    stamp = shard.stat().st_mtime_ns
    assert scenes.make_default_shards(tmp_path, **kwargs) == urls
    assert shard.stat().st_mtime_ns == stamp  # reused, not rewritten

    # An interrupted run leaves shards but no manifest: everything is written again.
    good = shard.read_bytes()
    shard.write_bytes(good[:100])
    (tmp_path / scenes.MANIFEST).unlink()
    scenes.make_default_shards(tmp_path, **kwargs)
    assert shard.read_bytes() == good

    # A different request replaces the old shards, surplus ones included.
    urls = scenes.make_default_shards(tmp_path, **{**kwargs, "n_train": 20, "seed": 1})
    assert sorted(str(p) for p in tmp_path.glob("train-*")) == list(braceexpand.braceexpand(urls["train"]))
    assert shard.read_bytes() != good
    assert json.loads((tmp_path / scenes.MANIFEST).read_text())["seed"] == 1


def test_main_prints_urls(tmp_path, capsys):
    out = tmp_path / "shapes"
    argv = ["--modality", "image", "--out", str(out), "--n-train", "12", "--n-val", "4", "--n-test", "4"]
    assert scenes.main(argv + ["--seed", "2", "--image-size", "32"]) == 0
    urls = json.loads(capsys.readouterr().out)
    assert set(urls) == {"train", "val", "test"}
    assert len(read_split(urls["train"])) == 12
    assert Image.open(io.BytesIO(read_split(urls["val"])[0]["png"])).size == (32, 32)
