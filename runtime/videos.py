"""Videos in, sampled frames out: read what users pass with PyAV (the decoder Transformers'
`load_video` uses by default) and sample it uniformly, within bounds.

Accepted per video: a path (str / os.PathLike) to a file PyAV reads, an array (numpy or torch)
[F, H, W, 3] uint8 of frames already decoded, or a `Video`. `read_video(item, num_frames)` returns
a `Video` holding `num_frames` frames.

Sampling (`SAMPLINGS`, the engine's `vision.frame_sampling`): with "transformers" (the default),
frame i of `num_frames` is frame floor(i * total / num_frames) of the video, counted in decode order -
Transformers' `default_sample_indices_fn` (video_utils.py) for a clip of at least `num_frames`
frames; with "official", about i * (total - 1) / (num_frames - 1) truncated: exactly the indices of
`np.linspace(0, total - 1, num_frames, dtype=int)` that Video-LLaVA's own loader (LanguageBind
processing_video.py, decord backend) reads (the 100-frame bunny clip: 0, 14, 28, ..., 99 against
0, 12, 25, ..., 87). A clip with fewer frames than `num_frames` is not refused: both formulas then
repeat frames (3 frames for 8: 0, 0, 0, 1, 1, 1, 2, 2 / 0, 0, 0, 0, 1, 1, 1, 2), so the model always
sees `num_frames` frames; `Video.indices` says which. A file whose header gives no frame count, or
more frames than decode, is sampled over the frames that decode (counted in a first pass).

Bounds (`VideoLimits`): file size, frames in the stream, frame width/height and pixels, duration.
A zero-length file, a file PyAV cannot open (corrupt, truncated, not a video), one with no video
stream (audio only), one that breaks off while decoding or decodes no frame, or one over a bound is
one ValueError line that names the video and the file; never a crash or a partial result.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .images import check_local_file

log = logging.getLogger("apet.runtime")
VideoLike = Any  # str | os.PathLike | np.ndarray [F, H, W, 3] uint8 | torch.Tensor | Video


@dataclass(frozen=True)
class VideoLimits:
    """What one video may cost before any frame is decoded; over a bound is an error."""

    max_bytes: int = 4 << 30  # 4 GiB file
    max_frames: int = 216_000  # frames in the stream: 2 h at 30 fps (decoding walks up to the last sampled one)
    max_side: int = 8192  # frame width and height, pixels
    max_pixels: int = 7680 * 4320  # per frame (8K UHD)
    max_seconds: float = 4 * 3600.0


@dataclass
class Video:
    """`frames` [F, H, W, 3] uint8 RGB, the sampled frames in time order; `indices` the frame number
    of each in the source (decode order); `total_frames` the frames the source has."""

    frames: np.ndarray
    indices: list[int]
    total_frames: int
    fps: float | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


SAMPLINGS = ("transformers", "official")


def sample_indices(total: int, num_frames: int, sampling: str = "transformers") -> list[int]:
    """Uniform frame indices, i = 0..num_frames-1, repeating frames when total < num_frames:
    "transformers" floor(i * total / num_frames); "official" np.linspace(0, total - 1, num_frames,
    dtype=int), i.e. i * (total - 1) / (num_frames - 1) truncated, as the official loader computes it."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"frame sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if total < 1 or num_frames < 1:
        raise ValueError(f"cannot sample {num_frames} frame(s) from {total}")
    if sampling == "official":
        # numpy's own float steps, not exact integer division: they differ where a step lands just
        # under an integer (123 frames for 15: frame 60 here, 61 by exact division)
        return [int(i) for i in np.linspace(0, total - 1, num_frames, dtype=int)]
    return [i * total // num_frames for i in range(num_frames)]


def as_video_list(videos: VideoLike | Sequence[VideoLike]) -> list[VideoLike]:
    """A single video or a sequence of videos -> a non-empty list (not yet read)."""
    if isinstance(videos, (str, os.PathLike, Video)):
        return [videos]
    if isinstance(videos, (np.ndarray, torch.Tensor)):
        return [videos] if videos.ndim != 5 else list(videos)
    if isinstance(videos, (list, tuple)):
        if len(videos) == 0:
            raise ValueError("empty batch: pass at least one video")
        return list(videos)
    raise TypeError(
        f"videos: expected a video (path or [F, H, W, 3] frames) or a list of them, got {type(videos).__name__}"
    )


def read_video(
    video: VideoLike,
    num_frames: int,
    index: int = 0,
    limits: VideoLimits | None = None,
    sampling: str = "transformers",
) -> Video:
    """One video of any accepted kind -> a Video of `num_frames` uniformly sampled frames (`sampling`:
    which, SAMPLINGS)."""
    where = f"video {index}"
    limits = limits or VideoLimits()
    sample_indices(1, 1, sampling)  # an unknown sampling fails before any file is read
    if isinstance(video, Video):
        return _resample(
            video.frames, video.indices, video.total_frames, num_frames, video.fps, video.source, where, sampling
        )
    if isinstance(video, (str, os.PathLike)):
        return _from_path(check_local_file(video, where, "video"), num_frames, where, limits, sampling)
    if isinstance(video, (np.ndarray, torch.Tensor, list, tuple)):
        frames = _frames_array(video, where, limits)
        return _resample(frames, list(range(len(frames))), len(frames), num_frames, None, "", where, sampling)
    raise TypeError(f"{where}: expected a video file path or [F, H, W, 3] uint8 frames, got {type(video).__name__}")


def _resample(frames, indices, total, num_frames, fps, source, where, sampling) -> Video:
    if len(frames) == 0:
        raise ValueError(f"{where}: no frames")
    pick = sample_indices(len(frames), num_frames, sampling)
    return Video(np.stack([frames[i] for i in pick]), [indices[i] for i in pick], total, fps, source)


def _frames_array(video, where: str, limits: VideoLimits) -> np.ndarray:
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu().numpy()
    a = np.asarray(video)
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"{where}: video frames must be [F, H, W, 3], got shape {tuple(a.shape)}")
    if a.dtype != np.uint8:
        raise TypeError(f"{where}: video frames must be uint8 (0..255), got dtype {a.dtype}")
    if 0 in a.shape:
        raise ValueError(f"{where}: zero-size video, shape {tuple(a.shape)}")
    _check_size(a.shape[2], a.shape[1], where, limits)
    return a


def _check_size(width: int, height: int, where: str, limits: VideoLimits) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"{where}: frames of {width}x{height} pixels")
    if max(width, height) > limits.max_side or width * height > limits.max_pixels:
        raise ValueError(
            f"{where}: frames of {width}x{height} pixels exceed the limit ({limits.max_side} per side, "
            f"{limits.max_pixels} pixels)"
        )


def _from_path(path: Path, num_frames: int, where: str, limits: VideoLimits, sampling: str) -> Video:
    import av

    size = path.stat().st_size  # a local regular file (check_local_file)
    if size == 0:
        raise ValueError(f"{where}: {path} is an empty file (0 bytes)")
    if size > limits.max_bytes:
        raise ValueError(f"{where}: {path} is {size} bytes, over the {limits.max_bytes}-byte limit for a video")
    try:
        with av.open(str(path)) as container:
            stream = _video_stream(container, path, where)
            fps = float(stream.average_rate) if stream.average_rate else None
            _check_size(stream.codec_context.width, stream.codec_context.height, where, limits)
            seconds = _duration(container, stream)
            if seconds is not None and seconds > limits.max_seconds:
                raise ValueError(f"{where}: {path} lasts {seconds:.0f} s, over the {limits.max_seconds:.0f} s limit")
            total = int(stream.frames or 0)
            if total > limits.max_frames:
                raise ValueError(f"{where}: {path} has {total} frames, over the {limits.max_frames}-frame limit")
            indices = sample_indices(total, num_frames, sampling) if total else []
            frames = _decode(container, stream, indices, path, where, limits)[0] if total else {}
        if total and len(frames) == len(set(indices)):  # every sampled frame decoded
            return _video(frames, indices, total, fps, path)
        with av.open(str(path)) as container:  # no or a wrong frame count: count what decodes, then sample
            stream = _video_stream(container, path, where)
            counted = _decode(container, stream, [], path, where, limits)[1]
        if counted == 0:
            raise ValueError(f"{where}: {path} has a video stream but no frame decodes (corrupt or truncated)")
        if total:
            log.warning("%s: %s promises %d frames but only %d decode; sampling those", where, path, total, counted)
        indices = sample_indices(counted, num_frames, sampling)
        with av.open(str(path)) as container:
            stream = _video_stream(container, path, where)
            frames, _ = _decode(container, stream, indices, path, where, limits)
        return _video(frames, indices, counted, fps, path)
    except av.error.FFmpegError as exc:
        raise ValueError(
            f"{where}: {path} could not be read as a video (corrupt, truncated or not a video: {exc})"
        ) from exc


def _video_stream(container, path: Path, where: str):
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise ValueError(f"{where}: {path} has no video stream (its streams: {', '.join(kinds)})")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def _duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1e6
    return None


def _decode(container, stream, indices: list[int], path: Path, where: str, limits: VideoLimits):
    """Decode in order up to the last wanted index (to the end when `indices` is empty) ->
    ({index: frame [H, W, 3] uint8}, frames decoded)."""
    wanted = set(indices)
    last = max(indices) if indices else limits.max_frames
    frames: dict[int, np.ndarray] = {}
    count = 0
    for frame in container.decode(stream):
        if count in wanted:
            _check_size(frame.width, frame.height, where, limits)
            frames[count] = frame.to_ndarray(format="rgb24")
        count += 1
        if count > last:
            break
    if not indices and count > limits.max_frames:
        raise ValueError(f"{where}: {path} decodes to more than {limits.max_frames} frames, over the limit")
    return frames, count


def _video(frames: dict[int, np.ndarray], indices: list[int], total: int, fps, path: Path) -> Video:
    shapes = {f.shape for f in frames.values()}
    if len(shapes) != 1:
        raise ValueError(f"{path}: the sampled frames differ in size ({sorted(shapes)})")
    return Video(np.stack([frames[i] for i in indices]), list(indices), total, fps, str(path))
