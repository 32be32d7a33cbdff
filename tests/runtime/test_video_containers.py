"""Which files FFmpeg may open for a video (runtime/videos.py): a known single-file container through
the `file` protocol only. An ffconcat script or an m3u8 playlist - whatever its name - is refused in
one line before FFmpeg opens anything it names; a FIFO named in such a script can never hang
`apet run` (each such run is a separate process under a timeout)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from apet_trt.runtime.videos import VIDEO_CONTAINERS, check_video_file, read_video

CLIP = Path(__file__).resolve().parents[2] / "assets" / "big_buck_bunny.mp4"
REFUSED = "its content is no container apet reads"
TIMEOUT = 60  # seconds: far above the refusal (well under 1 s of FFmpeg); only a hang reaches it


def _remux(src: Path, dst: Path) -> Path:
    """The clip's video packets, unchanged, in another container (FFmpeg picks it by dst's name)."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        stream = inp.streams.video[0]
        target = out.add_stream_from_template(stream)
        for packet in inp.demux(stream):
            if packet.dts is not None:
                packet.stream = target
                out.mux(packet)
    return dst


@pytest.fixture
def fifo_script(tmp_path) -> Path:
    """A real ffconcat script posing as clip.mp4, naming a FIFO beside it that nobody ever writes."""
    os.mkfifo(tmp_path / "pipe.fifo")
    script = tmp_path / "clip.mp4"
    script.write_text("ffconcat version 1.0\nfile 'pipe.fifo'\n")
    return script


def _python(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)


def test_an_ffconcat_script_naming_a_fifo_is_refused_without_hanging(fifo_script, tmp_path):
    code = (
        "import sys\nfrom apet_trt.runtime.videos import read_video\n"
        "try:\n    read_video(sys.argv[1], 8)\nexcept ValueError as e:\n    print(e); sys.exit(3)\n"
    )
    done = _python(code, str(fifo_script), cwd=tmp_path)  # subprocess.TimeoutExpired if it hangs
    assert done.returncode == 3, done.stderr
    [line] = done.stdout.splitlines()
    assert line.startswith("video 0: ") and "clip.mp4" in line and REFUSED in line


def test_apet_run_refuses_it_in_one_line_before_loading(fifo_script, tmp_path):
    argv = ["run", "--engine", str(tmp_path / "no-engine"), "--video", str(fifo_script), "--prompt", "x"]
    done = subprocess.run(
        [sys.executable, "-m", "apet_trt.scripts.cli", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 2
    [line] = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert line.startswith("apet run: error: ValueError: --video: ") and REFUSED in line  # not the missing engine


def test_a_script_naming_a_real_clip_is_refused_too(tmp_path):
    """Not just the FIFO: FFmpeg's concat demuxer would read this one happily (other files' bytes)."""
    (tmp_path / "real.mp4").write_bytes(CLIP.read_bytes())
    script = tmp_path / "innocent.mp4"
    script.write_text("ffconcat version 1.0\nfile 'real.mp4'\n")
    for call in (lambda: read_video(str(script), 8), lambda: check_video_file(script)):
        with pytest.raises(ValueError, match=REFUSED) as e:
            call()
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["list.m3u8", "list.mp4"])
def test_playlists_are_refused(tmp_path, name):
    (tmp_path / "real.mp4").write_bytes(CLIP.read_bytes())
    playlist = tmp_path / name
    playlist.write_text("#EXTM3U\n#EXT-X-TARGETDURATION:4\n#EXTINF:4.0,\nreal.mp4\n#EXT-X-ENDLIST\n")
    with pytest.raises(ValueError, match=r"could not be read as a video") as e:
        read_video(str(playlist), 8)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("suffix", [".mkv", ".mov", ".ts", ".flv"])
def test_known_containers_still_read_the_same_frames(tmp_path, suffix):
    """The same H.264 packets in each container decode to the frames of the original mp4 (WebM takes
    no H.264; its demuxer is Matroska's, read here as .mkv)."""
    remuxed = _remux(CLIP, tmp_path / f"clip{suffix}")
    want = read_video(str(CLIP), 8)
    got = read_video(str(remuxed), 8)
    assert np.array_equal(got.frames, want.frames) and got.indices == want.indices
    check_video_file(remuxed)


def test_avi_still_reads(tmp_path):
    """AVI (MPEG-4 Part 2, as PyAV writes it): 8 frames of the clip's size, sampled uniformly."""
    import av

    frames = read_video(str(CLIP), 100).frames
    path = tmp_path / "clip.avi"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 320, 180, "yuv420p"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    video = read_video(str(path), 8)
    assert video.frames.shape == (8, 180, 320, 3) and video.total_frames == 100
    assert np.abs(video.frames.astype(int) - frames[video.indices]).mean() < 8  # lossy, the same pictures
    check_video_file(path)


def test_a_fifo_put_at_the_path_after_the_checks_is_refused_not_waited_on(tmp_path):
    """The open itself never blocks (the race between check_local_file and FFmpeg's open): the file
    is opened without blocking and FFmpeg reads that very file, so a FIFO there is named, at once."""
    os.mkfifo(tmp_path / "swapped.mp4")
    code = (
        "import sys\nfrom pathlib import Path\nfrom apet_trt.runtime import videos\n"
        "try:\n    videos._open(Path(sys.argv[1]), 'video 0', videos.VideoLimits())\n"
        "except ValueError as e:\n    print(e); sys.exit(3)\n"
    )
    done = _python(code, str(tmp_path / "swapped.mp4"), cwd=tmp_path)
    assert done.returncode == 3, done.stderr
    assert "swapped.mp4 is not a regular file (a FIFO, socket or device)" in done.stdout


def test_a_path_that_looks_like_a_protocol_is_read_as_a_file(tmp_path, monkeypatch):
    """`concat:` (or any `scheme:`) at the start of a relative name is part of the file's name."""
    (tmp_path / "concat:clip.mp4").write_bytes(CLIP.read_bytes())
    monkeypatch.chdir(tmp_path)
    assert read_video("concat:clip.mp4", 8).frames.shape == (8, 180, 320, 3)


def test_the_whitelist_names_ffmpeg_demuxers():
    import av

    known = {alias for name in av.formats_available for alias in name.split(",")}
    assert set(VIDEO_CONTAINERS) <= known
    assert "concat" not in VIDEO_CONTAINERS and "hls" not in VIDEO_CONTAINERS
