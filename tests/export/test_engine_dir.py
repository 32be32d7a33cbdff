"""Issue 11, classes 2 and 3: builds that cannot destroy, race or die half-way.

  --force    replaces only a directory that verifies as an engine directory (an apet-trt manifest
             listing everything it holds); anything else is refused, untouched
  --out      checked before the build: '.', '..', a parent that is a file, inside / equal to /
             containing the model's checkpoint, the current directory
  the lock   a second build to the same --out (another thread or process) is refused while the
             first runs; the first finishes intact
  crashes    a process killed (SIGKILL) at each step of the replacement leaves the old or the new
             engine at --out - or, between the fallback's two renames, the old one beside it, which
             `apet inspect` names and the next build restores

Every refusal is one line, writes nothing and leaves no work, backup or lock file behind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from apet_trt.export import build as build_module
from apet_trt.export import engine_dir
from apet_trt.export.engine_dir import BuildLocked, EngineDirWriter
from apet_trt.scripts.cli import main
from helpers.engines import make_model, make_tokenizer
from helpers.guard import snapshot

PRESET = "tiny-llava"


def fake_engine(root: Path, text: str, extra: dict | None = None) -> Path:
    """A directory that verifies as an engine directory for --force: a manifest listing its files."""
    root.mkdir(parents=True, exist_ok=True)
    files = {"payload.txt": text, **(extra or {})}
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(content)
    manifest = {"format": "apet-trt-engine", "manifest_version": 2, "files": {rel: {} for rel in files}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith((".building", ".replaced", ".lock")))


@pytest.fixture
def no_load(monkeypatch):
    """Any build that gets past its --out checks fails loudly here: the checks come first."""

    def fail(*a, **k):
        raise AssertionError("the model was loaded before --out was refused")

    monkeypatch.setattr(build_module, "_load", fail)


def _one_line(capsys) -> str:
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in captured.err, captured.err
    assert err[0].startswith("apet build: error:"), err[0]
    return err[0]


# --- --force replaces engine directories only -----------------------------------------------------------


def _foreign_manifest(out: Path):
    out.mkdir()
    (out / "manifest.json").write_text('{"hello": "a manifest of some other tool"}')
    (out / "notes.txt").write_text("mine")


def _unlisted_user_file(out: Path):
    fake_engine(out, "old engine")
    (out / "notes.txt").write_text("my notes, kept beside the engine")


def _unlisted_link(out: Path):
    fake_engine(out, "old engine")
    (out / "link").symlink_to(out.parent)


def _symlinked_out(out: Path):
    real = fake_engine(out.parent / "real-engine", "old engine")
    out.symlink_to(real, target_is_directory=True)


def _manifest_is_a_link(out: Path):
    fake_engine(out.parent / "elsewhere", "x")
    out.mkdir()
    (out / "manifest.json").symlink_to(out.parent / "elsewhere" / "manifest.json")


FORCE_CASES = {
    "a manifest of another tool": (_foreign_manifest, r"not an engine directory \(manifest\.json is not an apet-trt"),
    "an unlisted user file": (_unlisted_user_file, r"it holds notes\.txt, which its manifest does not list"),
    "an unlisted link": (_unlisted_link, r"it holds link, which its manifest does not list"),
    "--out is a link": (_symlinked_out, r"is a symbolic link; refusing to replace it"),
    "manifest.json is a link": (_manifest_is_a_link, r"not an engine directory \(no manifest\.json\)"),
}


@pytest.mark.parametrize("case", sorted(FORCE_CASES))
def test_force_replaces_only_engine_directories(tmp_path, capsys, no_load, case):
    make, pattern = FORCE_CASES[case]
    out = tmp_path / "engine"
    make(out)
    before = snapshot(tmp_path)
    assert main(["build", "--model", PRESET, "--keep", "64", "--out", str(out), "--force"]) == 2
    assert re.search(pattern, _one_line(capsys))
    assert snapshot(tmp_path) == before  # nothing changed, nothing left behind


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_force_replaces_a_verified_engine_directory(tmp_path, monkeypatch, exchange):
    out = fake_engine(tmp_path / "engine", "old", {"old-only/stale.bin": "stale"})
    if not exchange:
        monkeypatch.setattr(engine_dir, "renameat2", lambda *a: False)
    with EngineDirWriter(out, force=True) as work:
        fake_engine(work, "new")
        assert leftovers(tmp_path) == [".engine.building", ".engine.lock"]
        with pytest.raises(BuildLocked):  # the lock is held while the work directory is written
            EngineDirWriter(out, force=True)
    assert (out / "payload.txt").read_text() == "old" and leftovers(tmp_path) == []  # not committed

    writer = EngineDirWriter(out, force=True)
    with writer as work:
        fake_engine(work, "new")
        writer.commit()
    assert (out / "payload.txt").read_text() == "new" and not (out / "old-only").exists()
    assert leftovers(tmp_path) == []


# --- --out checked before the build --------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A local LLaVA checkpoint directory (config, weights, tokenizer)."""
    ckpt = tmp_path_factory.mktemp("ckpt") / "llava"
    tokenizer = make_tokenizer()
    make_model(tokenizer).save_pretrained(str(ckpt))
    tokenizer.save_pretrained(str(ckpt))
    return ckpt


def _out_cases(tmp_path: Path, ckpt: Path) -> dict:
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "work" / "sub").mkdir(parents=True)
    return {
        "current directory": (["--out", "."], PRESET, r"names the current or a parent directory"),
        "parent directory": (["--out", ".."], PRESET, r"names the current or a parent directory"),
        "a/..": (["--out", "x/.."], PRESET, r"names the current or a parent directory"),
        "parent is a file": (["--out", str(tmp_path / "a-file" / "engine")], PRESET, r"a-file is a file"),
        "contains the cwd": (["--out", str(tmp_path / "work")], PRESET, r"is the current directory or contains it"),
        "inside the checkpoint": (["--out", str(ckpt / "engine")], str(ckpt), r"lies inside the model checkpoint"),
        "the checkpoint itself": (["--out", str(ckpt), "--force"], str(ckpt), r"is the model checkpoint .* itself"),
        "contains the checkpoint": (
            ["--out", str(ckpt.parent), "--force"],
            str(ckpt),
            r"contains the model checkpoint .*would delete the model",
        ),
    }


CASE_NAMES = [
    "current directory",
    "parent directory",
    "a/..",
    "parent is a file",
    "contains the cwd",
    "inside the checkpoint",
    "the checkpoint itself",
    "contains the checkpoint",
]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_out_is_checked_before_the_build(tmp_path, checkpoint, capsys, monkeypatch, no_load, case):
    args, model, pattern = _out_cases(tmp_path, checkpoint)[case]
    monkeypatch.chdir(tmp_path / "work" / "sub")
    before, ckpt_before = snapshot(tmp_path), snapshot(checkpoint.parent)
    assert main(["build", "--model", model, "--keep", "12", "--basis", "4", *args]) == 2
    assert re.search(pattern, _one_line(capsys))
    assert snapshot(tmp_path) == before and snapshot(checkpoint.parent) == ckpt_before


# --- one build per --out --------------------------------------------------------------------------------


def test_a_second_build_to_the_same_out_is_refused_while_the_first_runs(tmp_path, capsys, no_load):
    out = fake_engine(tmp_path / "engine", "old")
    first = EngineDirWriter(out, force=True)
    with first as work:
        fake_engine(work, "first")
        assert main(["build", "--model", PRESET, "--keep", "64", "--out", str(out), "--force"]) == 2
        line = _one_line(capsys)
        assert f"another apet build (pid {os.getpid()}) is writing it" in line and "BuildLocked" in line
        first.commit()
    assert (out / "payload.txt").read_text() == "first" and leftovers(tmp_path) == []


def test_a_build_in_another_process_holds_the_lock(tmp_path, capsys, no_load):
    """Two processes: while one holds --out, the other is refused; then the first commits whole."""
    out = fake_engine(tmp_path / "engine", "old")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["build", "--model", PRESET, "--keep", "64", "--out", str(out), "--force"]) == 2
        assert f"(pid {holder.pid}) is writing it" in _one_line(capsys)
        with pytest.raises(BuildLocked):
            EngineDirWriter(out, force=True)
    finally:
        holder.communicate("go\n", timeout=60)
    assert holder.returncode == 0
    assert (out / "payload.txt").read_text() == "from the other process" and leftovers(tmp_path) == []


HOLDER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from apet_trt.export.engine_dir import EngineDirWriter
    out = Path(sys.argv[1])
    writer = EngineDirWriter(out, force=True)
    with writer as work:
        (work / "payload.txt").write_text("from the other process")
        (work / "manifest.json").write_text(json.dumps({"format": "apet-trt-engine", "files": {"payload.txt": {}}}))
        print("locked", flush=True)
        sys.stdin.readline()
        writer.commit()
    """
)


# --- killed at each step ---------------------------------------------------------------------------------

KILLER = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path
    from apet_trt.export import engine_dir
    out, when = Path(sys.argv[1]), sys.argv[2]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    real_rename, real_renameat2 = os.rename, engine_dir.renameat2
    if when == "between the two renames":
        engine_dir.renameat2 = lambda *a: False
        def rename(src, dst):
            real_rename(src, dst)
            if str(dst).endswith(".replaced"):
                die()
        os.rename = rename
    if when == "after the exchange":
        def renameat2(src, dst, flags):
            done = real_renameat2(src, dst, flags)
            if done and flags == engine_dir.RENAME_EXCHANGE:
                die()
            return done
        engine_dir.renameat2 = renameat2
    writer = engine_dir.EngineDirWriter(out, force=True)
    with writer as work:
        (work / "payload.txt").write_text("new")
        (work / "manifest.json").write_text(json.dumps({"format": "apet-trt-engine", "files": {"payload.txt": {}}}))
        if when == "while building":
            die()
        writer.commit()
    """
)


def _killed(out: Path, when: str) -> None:
    r = subprocess.run([sys.executable, "-c", KILLER, str(out), when], capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr


def _exchange_works(tmp_path: Path) -> bool:
    a, b = tmp_path / "probe-a", tmp_path / "probe-b"
    a.mkdir(), b.mkdir()
    try:
        return engine_dir.renameat2(a, b, engine_dir.RENAME_EXCHANGE)
    finally:
        a.rmdir(), b.rmdir()


@pytest.mark.parametrize("when", ["while building", "after the exchange"])
def test_a_kill_leaves_a_whole_engine_and_the_next_build_cleans_up(tmp_path, when):
    if when == "after the exchange" and not _exchange_works(tmp_path):
        pytest.skip("this file system has no renameat2(RENAME_EXCHANGE); the two-rename case covers it")
    out = fake_engine(tmp_path / "engine", "old")
    _killed(out, when)
    expected = "old" if when == "while building" else "new"
    assert (out / "payload.txt").read_text() == expected  # a whole engine, old or new
    assert ".engine.building" in leftovers(tmp_path)  # what the killed process left ...
    writer = EngineDirWriter(out, force=True)
    with writer as work:  # ... the next build removes (a stale lock file is no obstacle)
        assert not any(p.name == "payload.txt" for p in work.iterdir())
        fake_engine(work, "next")
        writer.commit()
    assert (out / "payload.txt").read_text() == "next" and leftovers(tmp_path) == []


def test_a_kill_between_the_two_renames_is_named_and_undone(tmp_path, capsys):
    out = fake_engine(tmp_path / "engine", "old")
    _killed(out, "between the two renames")
    assert not out.exists() and (tmp_path / ".engine.replaced" / "payload.txt").read_text() == "old"
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted `apet build --force` left the previous engine at" in err[0], err
    # the next build to that --out puts the old engine back first, even if it then fails itself
    with pytest.raises(RuntimeError, match="this build fails"):
        with EngineDirWriter(out, force=True):
            raise RuntimeError("this build fails")
    assert (out / "payload.txt").read_text() == "old" and leftovers(tmp_path) == []
    assert "restored" in capsys.readouterr().err
