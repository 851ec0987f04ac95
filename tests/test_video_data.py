"""Video data: frame sampling, mp4 decoding (sequential and seeking), padding + mask, bad clips
skipped and counted through the WebDataset pipeline, and the built-in temporal clip generator."""

from __future__ import annotations

import io
import json

import av
import numpy as np
import pytest
import torch
import webdataset as wds

from mm_llama.data import clips
from mm_llama.data.collate import collate
from mm_llama.data.pipeline import CorruptSample, DataConfig, build_dataset
from mm_llama.data.scenes import COLOURS
from mm_llama.data.video import VideoFrames, decode_clip, encode_mp4, frame_view, sample_frame_indices
from tests.test_data_examples import chat_tokenizer

PALETTE = np.array(list(COLOURS.values()) + [(0, 0, 0), (128, 128, 128)], dtype=np.uint8)  # 10 well-separated colours


def solid_frames(n: int, size: tuple[int, int] = (32, 32)) -> list[np.ndarray]:
    """Frame k is a flat image of ``PALETTE[k % 10]``: its colour says which frame it was."""
    return [np.broadcast_to(PALETTE[k % len(PALETTE)], (*size, 3)).copy() for k in range(n)]


def frame_ids(images) -> list[int]:
    """Which palette entry each decoded frame shows (nearest colour of its mean)."""
    means = np.stack([np.asarray(im, dtype=np.float32).reshape(-1, 3).mean(0) for im in images])
    return np.abs(means[:, None] - PALETTE[None].astype(np.float32)).sum(-1).argmin(1).tolist()


# ----------------------------------------------------------------------------- sampling


def test_sample_indices_uniform_deterministic_and_cover_both_ends():
    for n, f in [(100, 16), (17, 8), (64, 64), (9, 8), (1000, 7)]:
        pts = [k * 40 for k in range(n)]
        picks = sample_frame_indices(pts, f)
        assert picks == sample_frame_indices(pts, f)  # deterministic
        assert len(picks) == f and all(b > a for a, b in zip(picks, picks[1:]))
        assert picks == [int((i + 0.5) * n / f) for i in range(f)]  # segment centres
        assert picks[0] < n / f and picks[-1] >= n - n / f  # first and last segments covered
        gaps = np.diff(picks)
        assert gaps.max() - gaps.min() <= 1  # uniform


def test_sample_indices_short_clip_and_variable_rate():
    assert sample_frame_indices([0, 10, 20], 8) == [0, 1, 2]  # the caller pads
    assert sample_frame_indices([5], 4) == [0]
    # Variable rate: frame 1 stays on screen from t=10 to t=80 of [0, 100): picked for every
    # segment centre there (12.5, 37.5, 62.5); frame 2 is on screen at 87.5.
    assert sample_frame_indices([0, 10, 80, 95, 97], 4, end=100) == [1, 1, 1, 2]
    with pytest.raises(ValueError, match="n_samples"):
        sample_frame_indices([0, 1], 0)


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("seek", [False, True], ids=["sequential", "seeking"])
def test_decode_takes_the_sampled_frames(seek):
    data = encode_mp4(solid_frames(40), fps=10, keyframe_interval=3)  # keyframes between the wanted frames
    clip = decode_clip(data, 8, backend="pyav", seek=seek)
    assert clip.n_frames == 40 and clip.duration == pytest.approx(4.0)
    assert frame_ids(clip.frames) == [k % 10 for k in sample_frame_indices(list(range(40)), 8)]


def test_variable_frame_rate_is_sampled_in_time():
    times = [0.0, 0.1, 0.2, 2.0, 2.1, 2.2, 3.8, 3.9]  # long gaps: frames 2 and 5 stay on screen
    clip = decode_clip(encode_mp4(solid_frames(8), fps=10, timestamps=times), 4, backend="pyav")
    ms = [round(t * 1000) for t in times]
    assert frame_ids(clip.frames) == sample_frame_indices(ms, 4, end=4000) == [2, 2, 5, 5]


def test_short_single_frame_and_odd_sized_clips_are_padded_and_resized():
    decode = VideoFrames(6, transform=lambda im: torch.from_numpy(np.array(im.resize((16, 16)))).permute(2, 0, 1))
    short = decode({"mp4": encode_mp4(solid_frames(3), fps=5)})
    assert short["video"].shape == (6, 3, 16, 16)
    assert short["frame_mask"].tolist() == [True] * 3 + [False] * 3
    assert torch.equal(short["video"][5], short["video"][2])  # padding repeats the last frame
    single = decode({"mp4": encode_mp4(solid_frames(1, size=(33, 47)), fps=5)})  # one frame, odd sides
    assert single["frame_mask"].tolist() == [True] + [False] * 5
    assert single["video"].shape == (6, 3, 16, 16)


def _audio_only_mp4() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def test_bad_clips_raise_corrupt_sample_of_their_kind():
    good = encode_mp4(solid_frames(10), fps=5)
    cases = {
        "bad_video": [b"", good[: len(good) // 2], b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64],
        "missing_video": [_audio_only_mp4()],
    }
    for kind, payloads in cases.items():
        for data in payloads:
            with pytest.raises(CorruptSample) as info:
                decode_clip(data, 4, backend="pyav")
            assert info.value.kind == kind


def test_pipeline_skips_and_counts_bad_clips(tmp_path):
    tok = chat_tokenizer()
    path = tmp_path / "clips-000000.tar"
    meta = json.dumps({"prompt": clips.VIDEO_PROMPT, "response": "The red square moves from left to right."}).encode()
    good = encode_mp4(solid_frames(12), fps=6)
    samples = [
        {"__key__": "good0", "mp4": good, "json": meta},
        {"__key__": "empty", "mp4": b"", "json": meta},
        {"__key__": "truncated", "mp4": good[: len(good) // 3], "json": meta},
        {"__key__": "audio_only", "mp4": _audio_only_mp4(), "json": meta},
        {"__key__": "no_mp4", "json": meta},
        {"__key__": "single", "mp4": encode_mp4(solid_frames(1), fps=6), "json": meta},
        {"__key__": "vfr_odd", "mp4": encode_mp4(solid_frames(5, (31, 45)), fps=6, timestamps=[0, .1, .5, .6, 1.4]),
         "json": meta},
    ]
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    cfg = DataConfig(train_urls=str(path), image_size=32)
    to_tensor = lambda im: torch.from_numpy(np.array(im.resize((32, 32)))).permute(2, 0, 1).float()  # noqa: E731
    media_id = tok.vocab_size + 1
    dataset = build_dataset(str(path), tok, None, media_id, train=False, cfg=cfg,
                            media=VideoFrames(4, to_tensor, backend="pyav"), media_placeholder="<|video|>")
    out = list(dataset)
    assert [x["meta"]["__key__"] for x in out] == ["good0", "single", "vfr_odd"]
    assert dataset.counter["bad_video"] == 2 and dataset.counter["missing_video"] == 2
    assert all((x["input_ids"] == media_id).sum() == 1 for x in out)
    batch = collate(out, pad_id=tok.pad_id)
    assert batch["videos"].shape == (3, 4, 3, 32, 32) and "images" not in batch
    assert batch["frame_mask"].sum(1).tolist() == [4, 1, 4]


def test_frame_views():
    videos = torch.arange(2 * 5, dtype=torch.float32).view(2, 5, 1, 1, 1).expand(2, 5, 3, 2, 2).clone()
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    assert frame_view(videos, mask, "ordered") is videos
    single = frame_view(videos, mask, "single")
    assert single[0, :, 0, 0, 0].tolist() == [2.0] * 5 and single[1, :, 0, 0, 0].tolist() == [6.0] * 5
    shuffled = frame_view(videos, mask, "shuffled", generator=torch.Generator().manual_seed(0))
    assert sorted(shuffled[0, :, 0, 0, 0].tolist()) == [0, 1, 2, 3, 4]
    assert sorted(shuffled[1, :3, 0, 0, 0].tolist()) == [5, 6, 7]  # real frames stay in the real slots
    assert shuffled[1, 3, 0, 0, 0] == shuffled[1, 2, 0, 0, 0]  # padding repeats the new last frame


# ----------------------------------------------------------------------------- generator


def test_clip_samples_are_deterministic_and_captioned():
    a, b = clips.make_clip_sample(0, "train", 3), clips.make_clip_sample(0, "train", 3)
    assert a["mp4"] == b["mp4"] and a["json"] == b["json"]
    metas = [json.loads(clips.make_clip_sample(0, "val", i)["json"]) for i in range(30)]
    assert {m["task"] for m in metas} == set(clips.CLIP_TASKS)
    assert len({m["frames"] for m in metas}) > 5 and len({m["fps"] for m in metas}) > 3  # random lengths, rates
    for m in metas:
        assert m["response"].startswith("The ") and m["response"].endswith(".")


def test_captions_need_temporal_order():
    """Reversing a clip gives another caption, and the middle frame alone is the same for both."""
    base = dict(shape="square", x=0.4, y=0.6, size=0.3, switch=0.5)
    pairs = [
        (clips.ClipEvent("move", colours=("red",), direction="from left to right", **base),
         clips.ClipEvent("move", colours=("red",), direction="from right to left", **base)),
        (clips.ClipEvent("appear", colours=("red",), direction="appears", **base),
         clips.ClipEvent("appear", colours=("red",), direction="disappears", **base)),
        (clips.ClipEvent("colour", colours=("red", "blue", "green"), direction="", **base),
         clips.ClipEvent("colour", colours=("green", "blue", "red"), direction="", **base)),
    ]
    ts = [0.0, 0.25, 0.49, 0.75, 0.999]
    for forward, backward in pairs:
        assert forward.caption != backward.caption
        frames = [clips.render_frame(forward, t, 32) for t in ts]
        reversed_frames = [clips.render_frame(backward, 1 - t, 32) for t in ts]
        assert all(np.array_equal(x, y) for x, y in zip(frames, reversed_frames)), forward.task


def test_clip_shapes_sit_in_the_grid_cells():
    """Shapes are where the image-trained frame encoder looks: near a cell centre of the 2x2 grid,
    and a move starts and ends on cell centres (so its first and last frames show a whole shape in one cell)."""
    import random

    def near_centre(v: float) -> bool:
        return min(abs(v - c) for c in clips.CELL_CENTRES) <= clips.JITTER + 1e-9

    events = [clips.sample_event(random.Random(i)) for i in range(200)]
    assert {e.task for e in events} == set(clips.CLIP_TASKS)
    for e in events:
        for t in (0.0, 1.0):
            _, x, y = e.state(t)
            assert near_centre(x) and near_centre(y), (e, t)
        if e.task == "move":
            (_, x0, y0), (_, x1, y1) = e.state(0.0), e.state(1.0)
            assert {round(abs(x1 - x0), 6), round(abs(y1 - y0), 6)} == {0.0, 0.5}, e  # one cell, one axis
    frame = clips.render_frame(events[0], 0.0, 64)
    lit = np.argwhere(frame.max(axis=2) > 0)  # [n, 2] (row, col) of the shape's pixels
    _, x, y = events[0].state(0.0)
    assert abs(lit[:, 1].mean() / 64 - x) < 0.05 and abs(lit[:, 0].mean() / 64 - y) < 0.05


def test_make_shards_video_cli(tmp_path, capsys):
    from mm_llama.cli import main

    out = tmp_path / "clips"
    assert main(["make-shards", "--modality", "video", "--out", str(out), "--n-train", "8", "--n-val", "4",
                 "--n-test", "4", "--samples-per-shard", "4"]) == 0
    urls = json.loads(capsys.readouterr().out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generator"] == "mm_llama.data.clips" and manifest["splits"]["train"]["n_samples"] == 8
    samples = list(wds.WebDataset(urls["train"], shardshuffle=False))
    assert len(samples) == 8 and all("mp4" in s and "json" in s for s in samples)
