"""Reading videos (runtime/videos.py): the frames Transformers' own load_video samples, and one clear
line for every file that cannot give them; a clip shorter than the frames asked repeats frames."""

from __future__ import annotations

import fractions
from pathlib import Path

import numpy as np
import pytest

from apet_trt.runtime.videos import Video, VideoLimits, read_video, sample_indices

CLIP = Path(__file__).resolve().parents[2] / "assets" / "big_buck_bunny.mp4"


def _write_clip(path: Path, frames: np.ndarray, **options) -> Path:
    """frames [F, H, W, 3] uint8 -> an H.264 mp4 (PyAV), e.g. movflags=faststart."""
    import av

    with av.open(str(path), "w", options=options) as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.time_base = fractions.Fraction(1, 25)
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts, frame.time_base = i, fractions.Fraction(1, 25)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_frames_equal_transformers_load_video():
    from transformers.video_utils import load_video

    for n in (8, 5):
        video = read_video(str(CLIP), n)
        frames, meta = load_video(str(CLIP), num_frames=n, backend="pyav")
        assert np.array_equal(video.frames, frames) and video.indices == list(meta.frames_indices)
        assert video.total_frames == 100 and video.fps == 25.0


def test_sampling_is_uniform_and_repeats_short_clips():
    assert sample_indices(100, 8) == [0, 12, 25, 37, 50, 62, 75, 87]
    assert sample_indices(3, 8) == [0, 0, 0, 1, 1, 1, 2, 2]
    assert sample_indices(1, 8) == [0] * 8


def test_official_sampling_is_numpys_linspace(tmp_path):
    """--frame-sampling official: LanguageBind's np.linspace(0, n - 1, 8, dtype=int), numpy's float
    steps included (123 frames for 15 is frame 60 there, 61 by exact integer division)."""
    assert sample_indices(100, 8, "official") == [0, 14, 28, 42, 56, 70, 84, 99]
    assert sample_indices(3, 8, "official") == [0, 0, 0, 0, 1, 1, 1, 2] and sample_indices(5, 1, "official") == [0]
    g = np.random.default_rng(2)
    for total, n in [(123, 15), *zip(g.integers(1, 5000, 200).tolist(), g.integers(1, 33, 200).tolist())]:
        assert sample_indices(total, n, "official") == np.linspace(0, total - 1, n, dtype=int).tolist(), (total, n)
    video = read_video(str(CLIP), 8, sampling="official")
    assert video.indices == [0, 14, 28, 42, 56, 70, 84, 99] and video.total_frames == 100
    frames = g.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    again = read_video(frames, 8, sampling="official")
    assert again.indices == [0, 2, 5, 8, 10, 13, 16, 19] and np.array_equal(again.frames, frames[again.indices])
    with pytest.raises(ValueError, match="frame sampling must be one of"):
        read_video(str(CLIP), 8, sampling="decord")


def test_a_clip_shorter_than_eight_frames_repeats_frames(tmp_path):
    g = np.random.default_rng(0)
    frames = g.integers(0, 256, (3, 64, 96, 3), dtype=np.uint8)
    video = read_video(str(_write_clip(tmp_path / "short.mp4", frames)), 8)
    assert video.frames.shape == (8, 64, 96, 3) and video.indices == [0, 0, 0, 1, 1, 1, 2, 2]
    assert np.array_equal(video.frames[0], video.frames[2]) and not np.array_equal(video.frames[2], video.frames[3])


def test_frames_given_as_an_array_or_a_video():
    g = np.random.default_rng(1)
    frames = g.integers(0, 256, (20, 32, 48, 3), dtype=np.uint8)
    video = read_video(frames, 8)
    assert np.array_equal(video.frames, frames[sample_indices(20, 8)])
    again = read_video(video, 4)
    assert isinstance(again, Video) and again.indices == [video.indices[i] for i in sample_indices(8, 4)]
    with pytest.raises(TypeError, match="video 2: video frames must be uint8"):
        read_video(frames.astype(np.float32), 8, index=2)
    with pytest.raises(ValueError, match="must be \\[F, H, W, 3\\]"):
        read_video(frames[0], 8)


def test_zero_length_corrupt_truncated_and_audio_only_files(tmp_path):
    import av

    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ValueError) as e:
        read_video(str(empty), 8)
    assert "empty file (0 bytes)" in _one_line(e)

    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(2).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError) as e:
        read_video(str(garbage), 8)
    assert "could not be read as a video" in _one_line(e)

    data = CLIP.read_bytes()  # moov at the end: cut anywhere, the container does not open
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as e:
        read_video(str(cut), 8)
    assert "corrupt, truncated or not a video" in _one_line(e)

    # moov first (faststart): the header promises 40 frames, the data stops early
    frames = np.random.default_rng(3).integers(0, 256, (40, 64, 64, 3), dtype=np.uint8)
    fast = _write_clip(tmp_path / "fast.mp4", frames, movflags="faststart").read_bytes()
    head = tmp_path / "fast_cut.mp4"
    head.write_bytes(fast[: len(fast) // 2])
    try:
        video = read_video(str(head), 8)  # what decodes is sampled (documented), or one clear line
        assert video.frames.shape[0] == 8 and video.total_frames < 40
    except ValueError as exc:
        assert "\n" not in str(exc) and "fast_cut.mp4" in str(exc)

    audio = tmp_path / "audio.m4a"
    with av.open(str(audio), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        samples = (np.sin(np.arange(16000) / 10.0)[None] * 0.3).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    with pytest.raises(ValueError) as e:
        read_video(str(audio), 8)
    assert "has no video stream (its streams: audio)" in _one_line(e)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_video(str(tmp_path / "missing.mp4"), 8)


def test_bounds(tmp_path):
    with pytest.raises(ValueError, match="over the 1000-byte limit"):
        read_video(str(CLIP), 8, limits=VideoLimits(max_bytes=1000))
    with pytest.raises(ValueError, match="over the 50-frame limit"):
        read_video(str(CLIP), 8, limits=VideoLimits(max_frames=50))
    with pytest.raises(ValueError, match="320x180 pixels exceed the limit"):
        read_video(str(CLIP), 8, limits=VideoLimits(max_side=256))
    with pytest.raises(ValueError, match="lasts 4 s, over the 2 s limit"):
        read_video(str(CLIP), 8, limits=VideoLimits(max_seconds=2))
