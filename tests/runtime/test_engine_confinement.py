"""Issue 11, class 1: an engine directory cannot reach outside itself.

Every path a manifest names is relative, stays inside the directory, is listed with its sha256 and
is no link; the disk walk follows no link (a symlinked sub-directory or file, a hard link, a FIFO
is refused); Transformers configs inside name no file outside; and the one legitimate outside
reference, a checkpoint built by path, is declared in `external_checkpoint`, fingerprinted at build,
shown by `apet inspect` and verified at load. Each hostile case is refused by `runtime.load` and by
`apet inspect` with one line, and nothing outside the engine directory is read or changed (Python
audit events and, where strace is installed, the process's system calls).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from apet_trt import runtime
from apet_trt.engine_format import SMALL_FILE_BYTES, fingerprint
from apet_trt.runtime.manifest import ManifestError, load_manifest
from apet_trt.scripts.cli import main
from helpers.engines import build_engine_dir, clip_processor_class, make_model, make_tokenizer, write_manifest
from helpers.guard import strace_paths, untouched


def sha256_file(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


PHOTO = str(Path(__file__).resolve().parents[2] / "assets" / "grace_hopper.jpg")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return build_engine_dir(tmp_path_factory.mktemp("conf") / "t8", keep=8)


@pytest.fixture
def dirs(pristine, tmp_path):
    """(engine, outside): a fresh copy of the engine, and a folder beside it holding bait - copies
    of the engine's own files, so a path that reached them would verify."""
    engine = shutil.copytree(pristine, tmp_path / "engine")
    outside = tmp_path / "outside"
    shutil.copytree(pristine / "hf", outside / "hf")
    shutil.copy(pristine / "vision.onnx", outside / "vision.onnx")
    shutil.copy(pristine / "processor" / "preprocessor_config.json", outside / "preprocessor_config.json")
    (outside / "secret.txt").write_text("not for engines")
    return engine, outside


def _data(engine: Path) -> dict:
    return json.loads((engine / "manifest.json").read_text())


def _entry(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _save(engine: Path, data: dict) -> None:
    (engine / "manifest.json").write_text(json.dumps(data, indent=2))


def _refused(engine: Path, outside: Path, capsys, pattern: str) -> None:
    """runtime.load and `apet inspect` both refuse, in one line matching pattern, and nothing under
    `outside` is touched by either."""
    capsys.readouterr()
    with untouched(outside):
        with pytest.raises(ManifestError, match=pattern):
            runtime.load(engine, backend="onnxruntime")
        assert main(["inspect", str(engine)]) == 2
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("apet inspect: error: ManifestError"), captured.err
    assert "Traceback" not in captured.err and "OK" not in captured.out.split()
    import re

    assert re.search(pattern, err[0]), err[0]


# --- paths the manifest names ------------------------------------------------------------------------


def _onnx_dotdot(engine, outside):
    data = _data(engine)
    data["engines"]["onnx"] = "../outside/vision.onnx"
    _save(engine, data)


def _onnx_absolute(engine, outside):
    data = _data(engine)
    data["engines"]["onnx"] = str(outside / "vision.onnx")
    _save(engine, data)


def _files_dotdot(engine, outside):
    data = _data(engine)
    data["files"]["../outside/secret.txt"] = _entry(outside / "secret.txt")
    _save(engine, data)


def _checkpoint_absolute(engine, outside):
    data = _data(engine)
    data["decoder"]["transformers"]["checkpoint"] = str(outside / "hf")
    _save(engine, data)


def _checkpoint_dotdot(engine, outside):
    data = _data(engine)
    data["decoder"]["transformers"]["checkpoint"] = "hf/../../outside/hf"
    _save(engine, data)


def _plan_not_listed(engine, outside):
    data = _data(engine)
    data["engines"]["tensorrt"] = "vision.plan"
    _save(engine, data)


def _undeclared_outside_path(engine, outside):
    data = _data(engine)
    data["model"]["path"] = str(outside)  # manifest_version 1's field: no longer a place for paths
    _save(engine, data)


def _external_for_a_preset(engine, outside):
    data = _data(engine)
    data["external_checkpoint"] = {"path": str(outside / "hf"), "fingerprint": {}}
    _save(engine, data)


PATH_CASES = {
    "onnx ..": (_onnx_dotdot, r"engines\.onnx: '\.\./outside/vision\.onnx' has an empty, '\.' or '\.\.' part"),
    "onnx absolute": (_onnx_absolute, r"engines\.onnx: '.*/outside/vision\.onnx' is absolute"),
    "files ..": (_files_dotdot, r"files\['\.\./outside/secret\.txt'\].*'\.\.' part"),
    "checkpoint absolute": (_checkpoint_absolute, r"decoder\.transformers\.checkpoint: .* is absolute"),
    "checkpoint ..": (_checkpoint_dotdot, r"decoder\.transformers\.checkpoint: 'hf/\.\./\.\./outside/hf'"),
    "plan not listed": (_plan_not_listed, r"engines\.tensorrt: 'vision\.plan' is not listed in files"),
    "undeclared path field": (_undeclared_outside_path, r"model\.path: unknown field"),
    "external for a preset": (_external_for_a_preset, r"external_checkpoint: must be set exactly when"),
}


@pytest.mark.parametrize("case", sorted(PATH_CASES))
def test_manifest_paths_cannot_leave_the_directory(dirs, capsys, case):
    engine, outside = dirs
    mutate, pattern = PATH_CASES[case]
    mutate(engine, outside)
    _refused(engine, outside, capsys, pattern)


# --- what is on disk ----------------------------------------------------------------------------------


def _symlinked_subdir(engine, outside):
    (outside / "extra").mkdir()
    (outside / "extra" / "weights.bin").write_bytes(b"unlisted, behind a link")
    (engine / "extra").symlink_to(outside / "extra", target_is_directory=True)


def _symlinked_file(engine, outside):
    target = engine / "processor" / "preprocessor_config.json"
    target.unlink()
    target.symlink_to(outside / "preprocessor_config.json")  # same bytes: the sha256 still matches


def _symlinked_manifest(engine, outside):
    shutil.move(engine / "manifest.json", outside / "manifest.json")
    (engine / "manifest.json").symlink_to(outside / "manifest.json")


def _hard_link(engine, outside):
    os.link(outside / "secret.txt", engine / "tokenizer" / "notes.txt")
    data = _data(engine)
    data["files"]["tokenizer/notes.txt"] = _entry(outside / "secret.txt")
    _save(engine, data)


def _fifo(engine, outside):
    os.mkfifo(engine / "hf" / "pipe.safetensors")  # reading it would block forever


def _unlisted_in_subfolder(engine, outside):
    (engine / "tokenizer" / "added.json").write_text("{}")


DISK_CASES = {
    "symlinked sub-directory": (_symlinked_subdir, r"engine/extra: is a symbolic link"),
    "symlinked file": (_symlinked_file, r"preprocessor_config\.json: is a symbolic link"),
    "symlinked manifest": (_symlinked_manifest, r"manifest\.json: is a symbolic link"),
    "hard link": (_hard_link, r"notes\.txt: has 2 hard links"),
    "fifo": (_fifo, r"pipe\.safetensors: not a regular file"),
    "unlisted file": (_unlisted_in_subfolder, r"added\.json: file not listed in the manifest"),
}


@pytest.mark.parametrize("case", sorted(DISK_CASES))
def test_the_disk_walk_follows_no_link(dirs, capsys, case):
    engine, outside = dirs
    mutate, pattern = DISK_CASES[case]
    mutate(engine, outside)
    _refused(engine, outside, capsys, pattern)


# --- what files inside the directory name --------------------------------------------------------------


def _tokenizer_file_outside(engine, outside):
    path = engine / "tokenizer" / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_file"] = str(outside / "secret.txt")
    path.write_text(json.dumps(config))
    write_manifest(engine, _data(engine))  # re-hashed: the checksums alone cannot tell


def _shard_index_outside(engine, outside):
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "../../outside/hf/model.safetensors"}}
    (engine / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    write_manifest(engine, _data(engine))


def _pickle_weights(engine, outside):
    (engine / "hf" / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle: unpickling runs code
    write_manifest(engine, _data(engine))


CONFIG_CASES = {
    "tokenizer_file absolute": (_tokenizer_file_outside, r"tokenizer_config\.json: .*tokenizer_file: .* is absolute"),
    "shard index ..": (_shard_index_outside, r"model\.safetensors\.index\.json: .*weight_map.*'\.\.' part"),
    "pickle weights": (_pickle_weights, r"pytorch_model\.bin'\]: a pickle file"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_configs_inside_name_no_file_outside(dirs, capsys, case):
    engine, outside = dirs
    mutate, pattern = CONFIG_CASES[case]
    mutate(engine, outside)
    _refused(engine, outside, capsys, pattern)


def test_the_accessors_confine_every_path(dirs):
    engine, _ = dirs
    m = load_manifest(engine)
    assert m.engine_path("onnx") == engine / "vision.onnx"
    assert m.transformers_checkpoint() == engine / "hf" and m.processor_dir == engine / "processor"
    for bad in ("../outside/vision.onnx", "/etc/passwd", "hf/../../x", "nope.onnx"):
        with pytest.raises(ManifestError):
            m.path_of(bad)


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed: the system-call check needs it")
def test_no_system_call_touches_the_outside(dirs, tmp_path):
    """The whole verification, in a fresh process traced by strace: no file system call names a path
    under `outside`, for a symlinked sub-directory and for a '..' path in the manifest."""
    engine, outside = dirs
    _symlinked_subdir(engine, outside)
    other = shutil.copytree(engine, tmp_path / "engine2", symlinks=True)
    (other / "extra").unlink()
    _files_dotdot(other, outside)
    code = (
        "import sys; from apet_trt.runtime.manifest import load_manifest\n"
        "for e in sys.argv[1:]:\n"
        "    try: load_manifest(e)\n"
        "    except Exception as exc: print(type(exc).__name__, exc)\n"
    )
    result, trace = strace_paths([sys.executable, "-c", code, str(engine), str(other)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ManifestError") == 2, result.stdout
    assert str(outside) not in trace and "outside" not in trace


# --- the one reference outside: a checkpoint built by path --------------------------------------------


@pytest.fixture(scope="module")
def by_path(tmp_path_factory):
    """(checkpoint, engine): a local LLaVA checkpoint and `apet build --model CHECKPOINT`."""
    root = tmp_path_factory.mktemp("bypath")
    ckpt = root / "llava-ckpt"
    tokenizer = make_tokenizer()
    make_model(tokenizer).save_pretrained(str(ckpt))
    tokenizer.save_pretrained(str(ckpt))
    clip_processor_class()(size={"shortest_edge": 84}, crop_size={"height": 84, "width": 84}).save_pretrained(str(ckpt))
    engine = root / "engine"
    rc = main(["build", "--model", str(ckpt), "--keep", "12", "--basis", "4", "--max-batch", "2", "--out", str(engine)])
    assert rc == 0
    return ckpt, engine


def test_checkpoint_by_path_is_declared_fingerprinted_and_never_copied(by_path, capsys):
    ckpt, engine = by_path
    data = _data(engine)
    ext = data["external_checkpoint"]
    assert data["model"]["source"] == "path" and ext["path"] == os.path.realpath(ckpt)
    assert data["decoder"]["transformers"] == {"checkpoint": None, "weights": "saved"}
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    assert set(ext["fingerprint"]) == on_disk
    assert ext["fingerprint"]["config.json"]["sha256"] == sha256_file(ckpt / "config.json")
    weights = sha256_file(ckpt / "model.safetensors")
    assert all(e["sha256"] != weights for e in data["files"].values())  # referenced, never copied
    # the writer's (strict) fingerprint and the runtime's (lenient) agree on a readable checkpoint
    assert fingerprint(ckpt, strict=False) == fingerprint(ckpt, strict=True) == ext["fingerprint"]
    capsys.readouterr()
    assert main(["inspect", str(engine)]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint   {ckpt}" in out and "outside the directory" in out and out.strip().endswith("OK")
    pipe = runtime.load(engine, backend="onnxruntime")
    assert pipe.manifest.transformers_checkpoint() == Path(ext["path"])
    [r] = pipe.generate(PHOTO, "What is it?", max_new_tokens=2)
    assert len(r.positions) == 12


def _refuses(engine, capsys, pattern):
    with pytest.raises(ManifestError, match=pattern):
        runtime.load(engine, backend="onnxruntime")
    capsys.readouterr()
    assert main(["inspect", str(engine)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ManifestError" in err[0], err


def test_a_changed_or_missing_checkpoint_is_refused(by_path, capsys):
    ckpt, engine = by_path
    config = ckpt / "config.json"
    original = config.read_bytes()
    config.write_bytes(original.replace(b'"vision_feature_layer": -2', b'"vision_feature_layer": -1'))
    _refuses(engine, capsys, r"config\.json: changed since the build.*rebuild it")
    config.write_bytes(original)
    load_manifest(engine)  # restored: verifies again

    (ckpt / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    _refuses(engine, capsys, r"model\.safetensors\.index\.json: was added after the build")
    (ckpt / "model.safetensors.index.json").unlink()

    weights = ckpt / "model.safetensors"
    with open(weights, "ab") as f:
        f.write(b"\0")
    _refuses(engine, capsys, r"model\.safetensors: changed since the build")
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 1)

    moved = ckpt.with_name("moved-away")
    ckpt.rename(moved)
    try:
        _refuses(engine, capsys, r"the checkpoint the engine was built from, .*llava-ckpt, is missing")
    finally:
        moved.rename(ckpt)
    load_manifest(engine)


def test_the_fingerprint_follows_file_links_and_skips_hidden_names(tmp_path):
    """The writer's and the runtime's fingerprints agree on what a Hugging Face cache snapshot looks
    like: files that are links into a blob folder, hidden files, a sub-folder, a large file."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    (snap / "sub").mkdir(parents=True)
    (blobs / "abc").write_text('{"model_type": "llava"}')
    (snap / "config.json").symlink_to(blobs / "abc")
    (snap / ".gitattributes").write_text("*.bin lfs")
    (snap / "sub" / "tokenizer.json").write_text("{}")
    with open(snap / "big.safetensors", "wb") as f:
        f.truncate(SMALL_FILE_BYTES + 1)  # sized, not hashed
    got = fingerprint(snap, strict=True)
    assert got == fingerprint(snap, strict=False)
    assert set(got) == {"config.json", "sub/tokenizer.json", "big.safetensors"}
    assert "sha256" not in got["big.safetensors"] and got["config.json"]["bytes"] == 23
    assert got["config.json"]["sha256"] == hashlib.sha256(b'{"model_type": "llava"}').hexdigest()
    assert got["sub/tokenizer.json"]["sha256"] == hashlib.sha256(b"{}").hexdigest()


def test_a_dangling_link_fails_the_writer_and_differs_for_the_reader(tmp_path):
    """Strict (apet build): a checkpoint file that cannot be read is an error naming it. Lenient (the
    runtime at load): it is recorded as -1 bytes, which no fingerprint the writer made holds."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").symlink_to(tmp_path / "gone")
    with pytest.raises(ValueError, match=r"model\.safetensors: a checkpoint file that cannot be read"):
        fingerprint(tmp_path, strict=True)
    assert fingerprint(tmp_path, strict=False)["model.safetensors"] == {"bytes": -1}


def test_a_fresh_interpreter_refuses_with_one_line(dirs):
    """`apet inspect` as users run it: exit status 2, one line on stderr, nothing on stdout but the
    summary is never printed for a manifest that fails its schema."""
    engine, outside = dirs
    _onnx_dotdot(engine, outside)
    r = subprocess.run(
        [sys.executable, "-m", "apet_trt.scripts.cli", "inspect", str(engine)], capture_output=True, text=True
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "engines.onnx" in r.stderr


def test_the_guard_sees_reads_and_changes_outside(dirs):
    """The audit-event guard the tests above rely on can fail: a read, a listing and a change are seen."""
    _, outside = dirs
    for touch in (
        lambda: (outside / "secret.txt").read_text(),
        lambda: os.listdir(outside),
        lambda: (outside / "new.txt").write_text("x"),
    ):
        with pytest.raises(AssertionError, match="accessed outside"):
            with untouched(outside):
                touch()
    (outside / "new.txt").unlink()
