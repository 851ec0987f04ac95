"""mp4 clips: writing (PyAV), uniform frame sampling and decoding (PyAV, or torchcodec when installed).

Shape legend: ``f`` sampled frames, ``H``/``W`` frame height/width.

Decoding never holds a whole clip: the container is first *demuxed* (packets only,
nothing decoded) to learn every frame's presentation timestamp and which frames are
keyframes, the ``f`` wanted frames are chosen from those timestamps, and then frames
are decoded in order and only the wanted ones are kept, stopping after the last one.
Whenever a keyframe lies between the decoder's position and the next wanted frame,
the decoder seeks to it instead of decoding the frames in between, so a long clip
costs about ``f`` keyframe intervals of decoding, not its length. Timestamps, not frame indices, make the sampling
uniform in *time*, so a variable-frame-rate clip is sampled like its constant-rate
twin (a frame shown for long is the one picked for every instant it covers).

Every way a clip can be unusable raises :class:`~mm_llama.data.pipeline.CorruptSample`
(``missing_video``: no ``mp4`` entry or no video stream; ``bad_video``: empty,
truncated or undecodable bytes), which the pipeline skips and counts.
"""

from __future__ import annotations

import bisect
import importlib.util
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import PIL.Image
import torch

from mm_llama.data.pipeline import CorruptSample

VIDEO_EXTENSIONS = ("mp4",)
FRAME_VIEWS = ("ordered", "shuffled", "single")
"""How evaluation may present a clip's frames (see :func:`frame_view`)."""


# ---------------------------------------------------------------- writing


def encode_mp4(
    frames: Sequence[np.ndarray],
    fps: float,
    *,
    timestamps: Sequence[float] | None = None,
    crf: int = 18,
    keyframe_interval: int | None = None,
) -> bytes:
    """H.264 mp4 bytes of RGB ``frames`` (each ``uint8 [H, W, 3]``, all the same size).

    Args:
        frames: at least one frame.
        fps: nominal frame rate (the stream's declared rate).
        timestamps: presentation time of each frame in seconds (increasing), for a
            variable-frame-rate clip; ``None``: frame ``k`` at ``k / fps``.
        crf: x264 quality (lower is better; 18 keeps the flat colours of the built-in clips).
        keyframe_interval: frames between keyframes; ``None``: x264's default (250).

    Odd widths or heights are written in ``yuv444p`` (4:2:0 needs even sides).
    """
    if not frames:
        raise ValueError("encode_mp4 needs at least one frame")
    if timestamps is not None and len(timestamps) != len(frames):
        raise ValueError(f"got {len(frames)} frames but {len(timestamps)} timestamps")
    h, w = frames[0].shape[:2]
    time_base = Fraction(1, 1000)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p" if w % 2 == 0 and h % 2 == 0 else "yuv444p"
        stream.codec_context.time_base = time_base
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        if keyframe_interval is not None:
            stream.codec_context.gop_size = keyframe_interval
        for k, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            seconds = timestamps[k] if timestamps is not None else k / fps
            frame.pts, frame.time_base = round(seconds * 1000), time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


# ---------------------------------------------------------------- sampling


def sample_frame_indices(timestamps: Sequence[float], n_samples: int, end: float | None = None) -> list[int]:
    """Which frames to take: one per equal time segment of the clip, at the segment's centre.

    The clip ``[timestamps[0], end)`` is cut into ``n_samples`` equal segments; each
    contributes the frame on screen at its centre (the last frame whose timestamp is
    ``<=`` the centre). For a constant frame rate this is frame
    ``floor((i + 0.5) * n / n_samples)``: deterministic, strictly increasing, the
    first pick inside the first segment and the last inside the last. A clip with
    fewer frames than ``n_samples`` gives all of its frames (the caller pads).

    Args:
        timestamps: presentation times of the clip's frames, increasing (any unit).
        n_samples: ``f``, frames wanted (>= 1).
        end: end of the clip (after its last frame); ``None``: last timestamp plus the
            median frame interval.

    Returns:
        ``min(n, f)`` frame indices, non-decreasing (a frame that stays on screen over
        several segment centres of a variable-rate clip is picked for each).
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    n = len(timestamps)
    if n == 0:
        raise ValueError("a clip with no frames has nothing to sample")
    if n <= n_samples:
        return list(range(n))
    start = timestamps[0]
    if end is None:
        end = timestamps[-1] + float(np.median(np.diff(timestamps)))
    span = end - start
    picks = []
    for i in range(n_samples):
        centre = start + (i + 0.5) * span / n_samples
        picks.append(max(0, bisect.bisect_right(timestamps, centre) - 1))
    return picks


# ---------------------------------------------------------------- decoding


@dataclass
class DecodedClip:
    """The sampled frames of one clip.

    Attributes:
        frames: ``min(n, f)`` RGB images in time order.
        n_frames: frames in the whole clip.
        duration: seconds from the first frame to the clip's end.
    """

    frames: list[PIL.Image.Image]
    n_frames: int
    duration: float


def _pyav_decode(data: bytes, n_samples: int, seek: bool) -> DecodedClip:
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams})
            raise CorruptSample("missing_video", f"mp4 has no video stream (streams: {kinds or 'none'})")
        stream = container.streams.video[0]
        # Demux only (no decoding): every frame's pts, in presentation order.
        packets = [(p.pts, p.duration or 0, p.is_keyframe) for p in container.demux(stream)
                   if p.pts is not None and p.size]
        if not packets:
            raise CorruptSample("bad_video", "video stream has no frames")
        packets.sort()
        keyframes = [p for p, _, key in packets if key]
        pts = [p for p, _, _ in packets]
        last_duration = packets[-1][1] or (pts[-1] - pts[-2] if len(pts) > 1 else 1)
        picks = sample_frame_indices(pts, n_samples, end=pts[-1] + last_duration)
        wanted: dict[int, list[int]] = {}
        for slot, index in enumerate(picks):
            wanted.setdefault(pts[index], []).append(slot)
        frames: list[PIL.Image.Image | None] = [None] * len(picks)
        position = None  # pts of the last decoded frame
        decoded = None
        for target in sorted(wanted):
            k = bisect.bisect_right(keyframes, target) - 1
            keyframe = keyframes[k] if k >= 0 else pts[0]
            if decoded is None or (seek and position is not None and keyframe > position):
                container.seek(keyframe, stream=stream, backward=True, any_frame=False)
                decoded = container.decode(stream)
            for frame in decoded:
                position = frame.pts
                if frame.pts is not None and frame.pts >= target:
                    image = frame.to_image()  # only the wanted frames are converted and kept
                    for slot in wanted[target]:
                        frames[slot] = image
                    break
        missing = [picks[i] for i, f in enumerate(frames) if f is None]
        if missing:
            raise CorruptSample("bad_video", f"frames {missing[:4]} of {len(pts)} could not be decoded (truncated?)")
        duration = float((pts[-1] + last_duration - pts[0]) * stream.time_base)
        return DecodedClip(frames, len(pts), duration)  # type: ignore[arg-type]


def _torchcodec_decode(data: bytes, n_samples: int, seek: bool) -> DecodedClip:
    """The same sampling through torchcodec's decoder (exact seek mode scans the timestamps)."""
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(data, seek_mode="exact")
    meta = decoder.metadata
    n = meta.num_frames or 0
    if n == 0:
        raise CorruptSample("bad_video", "video stream has no frames")
    begin, end = meta.begin_stream_seconds, meta.end_stream_seconds
    if n <= n_samples:
        batch = decoder.get_frames_at(indices=list(range(n)))
    else:
        centres = [begin + (i + 0.5) * (end - begin) / n_samples for i in range(n_samples)]
        batch = decoder.get_frames_played_at(seconds=centres)
    frames = [PIL.Image.fromarray(x.permute(1, 2, 0).numpy()) for x in batch.data]  # [3, H, W] -> [H, W, 3]
    return DecodedClip(frames, n, float(end - begin))


_BACKENDS: dict[str, Callable[[bytes, int, bool], DecodedClip]] = {"pyav": _pyav_decode, "torchcodec": _torchcodec_decode}


def default_backend() -> str:
    """``"torchcodec"`` when it is installed, else ``"pyav"``."""
    return "torchcodec" if importlib.util.find_spec("torchcodec") is not None else "pyav"


def decode_clip(data: bytes, n_samples: int, *, backend: str | None = None, seek: bool = True) -> DecodedClip:
    """Decode the ``f = n_samples`` uniformly sampled frames of an mp4 clip.

    Args:
        data: the mp4 bytes.
        n_samples: frames wanted.
        backend: ``"pyav"`` or ``"torchcodec"``; ``None``: :func:`default_backend`.
        seek: (PyAV) jump to the keyframe before a wanted frame when one lies ahead of the
            decoder; ``False`` decodes straight through (the same frames, for comparison).

    Raises:
        CorruptSample: ``bad_video`` (empty, truncated or undecodable) or
            ``missing_video`` (no video stream).
    """
    backend = backend or default_backend()
    if backend not in _BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; known: {sorted(_BACKENDS)}")
    if not data:
        raise CorruptSample("bad_video", "mp4 is empty (0 bytes)")
    try:
        return _BACKENDS[backend](data, n_samples, seek)
    except CorruptSample:
        raise
    except (av.FFmpegError, RuntimeError, ValueError, EOFError) as exn:  # what FFmpeg / torchcodec raise on bad bytes
        raise CorruptSample("bad_video", f"{type(exn).__name__}: {str(exn)[:200]}") from exn


class VideoFrames:
    """Sample ``mp4`` bytes → ``{"video": [f, 3, H, W], "frame_mask": [f]}``.

    Short clips are padded to ``f`` frames by repeating their last frame; ``frame_mask``
    is True on real frames. Each frame goes through ``transform`` (the image encoder's
    :func:`~encoders.preprocess.image_transform`, so frames are resized and normalised
    exactly as images are).
    """

    def __init__(self, n_frames: int, transform: Callable[[PIL.Image.Image], torch.Tensor],
                 backend: str | None = None) -> None:
        if n_frames < 1:
            raise ValueError(f"n_frames must be >= 1, got {n_frames}")
        self.n_frames, self.transform, self.backend = n_frames, transform, backend or default_backend()

    def __call__(self, sample: dict) -> dict[str, torch.Tensor]:
        ext = next((e for e in VIDEO_EXTENSIONS if e in sample), None)
        if ext is None:
            raise CorruptSample("missing_video", f"entries {sorted(k for k in sample if not k.startswith('__'))}")
        clip = decode_clip(sample[ext], self.n_frames, backend=self.backend)
        tensors = [self.transform(frame) for frame in clip.frames]  # each [3, H, W]
        real = len(tensors)
        tensors += [tensors[-1]] * (self.n_frames - real)
        mask = torch.arange(self.n_frames) < real  # [f]
        return {"video": torch.stack(tensors), "frame_mask": mask}  # [f, 3, H, W], [f]


# ---------------------------------------------------------------- evaluation views


def frame_view(videos: torch.Tensor, frame_mask: torch.Tensor, view: str,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Re-present each clip's real frames for the temporal ablations.

    Args:
        videos: ``[b, f, 3, H, W]``.
        frame_mask: ``[b, f]`` bool, True on real frames (a prefix of each row).
        view: ``"ordered"`` (unchanged), ``"shuffled"`` (real frames in a random order)
            or ``"single"`` (the middle real frame in every real slot).
        generator: seeds the shuffle.

    Returns:
        ``[b, f, 3, H, W]``; padding slots repeat the new last real frame, as in the pipeline.
    """
    if view not in FRAME_VIEWS:
        raise ValueError(f"view must be one of {FRAME_VIEWS}, got {view!r}")
    if view == "ordered":
        return videos
    out = videos.clone()
    for row in range(videos.shape[0]):
        n = max(1, int(frame_mask[row].sum()))
        if view == "shuffled":
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.full((n,), n // 2, dtype=torch.long)
        out[row, :n] = videos[row, order]
        out[row, n:] = out[row, n - 1]
    return out
