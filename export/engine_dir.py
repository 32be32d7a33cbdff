"""Where `apet build` writes: --out checked before the build, one build per --out at a time, and a
replacement of an existing engine that no crash can lose.

    writer = EngineDirWriter(out, force=False, inputs=[checkpoint])  # checks --out, writes nothing
    ...                                                              # load the model (minutes)
    with writer as work:  # parents made, lock taken, an interrupted earlier build settled
        ...               # write the whole engine directory into `work`
        writer.commit()   # `work` becomes `out` in one step

Beside the target engines/NAME live, only while a build runs or after it was killed:
    engines/.NAME.lock       the lock (fcntl.flock): a second build to the same --out is refused
    engines/.NAME.building   the work directory: the new engine while it is built
    engines/.NAME.replaced   the old engine between the two renames of the fallback replacement

Replacing: on Linux, renameat2(RENAME_EXCHANGE) swaps `work` and `out` atomically - `out` is at
every instant the old or the new engine - and the old one, now at .NAME.building, is removed.
Where the exchange is missing (another OS, a file system without it) `out` is renamed to
.NAME.replaced, `work` to `out`, and .NAME.replaced removed; a kill between the two renames
leaves .NAME.replaced and no `out`, and the next build to that --out puts it back before it starts
(`apet run` and `apet inspect` say so meanwhile). `--force` replaces only a directory that
verifies as an engine directory: an apet-trt manifest listing every file it holds.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import stat
import sys
import weakref
from collections.abc import Sequence
from pathlib import Path

from apet_trt.engine_format import FORMAT, MAX_MANIFEST_BYTES
from apet_trt.engine_format import MANIFEST_NAME as MANIFEST

_AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


class BuildLocked(RuntimeError):
    """Another build is writing the same --out."""


# --- checks before the build ----------------------------------------------------------------------


def _within(inner: str, outer: str) -> bool:
    """inner is outer or lies under it (both real, absolute paths)."""
    return os.path.commonpath([inner, outer]) == outer


def engine_dir_problem(path: Path) -> str | None:
    """Why `path` is not an engine directory that --force may replace (None: it is one): an
    apet-trt manifest that lists every file the directory holds, so nothing else is lost."""
    manifest = path / MANIFEST
    st = manifest.lstat() if manifest.exists() or manifest.is_symlink() else None
    if st is None or not stat.S_ISREG(st.st_mode):
        return "no manifest.json"
    if st.st_size > MAX_MANIFEST_BYTES:
        return "manifest.json is too large to be an apet-trt manifest"
    try:
        data = json.loads(manifest.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return "manifest.json is not JSON"
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return f"manifest.json is not an apet-trt manifest (format != {FORMAT!r})"
    listed = data.get("files")
    if not isinstance(listed, dict):
        return "its manifest lists no files"
    for dirpath, dirnames, filenames in os.walk(path):  # links are entries, never followed
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            rel = Path(dirpath, name).relative_to(path).as_posix()
            if rel != MANIFEST and rel not in listed:
                return f"it holds {rel}, which its manifest does not list"
    return None


def check_out(out: str | os.PathLike, *, force: bool = False, inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Everything about --out that can be known before the build (nothing is written): a name
    that a rename can replace, a parent that can hold it, no overlap with the model's checkpoint
    (`inputs`), and an existing directory only if empty or, with force, an engine directory.
    Returns the absolute target."""
    given = os.fspath(out)
    if Path(given).name in ("", ".", ".."):
        raise ValueError(f"--out {given!r} names the current or a parent directory; name a new one, e.g. engines/NAME")
    target = Path(os.path.abspath(os.path.expanduser(given)))
    real = os.path.realpath(target)
    if _within(os.path.realpath(os.getcwd()), real):
        raise ValueError(f"--out {given} is the current directory or contains it; name another directory")
    ancestor = next(p for p in target.parents if p.exists() or p.is_symlink())
    if not ancestor.is_dir():
        raise NotADirectoryError(f"--out {given}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {given}: no permission to create it in {ancestor}")
    for source in inputs:
        real_in = os.path.realpath(os.path.expanduser(source))
        if real == real_in:
            raise ValueError(f"--out {given} is the model checkpoint {source} itself")
        if _within(real, real_in):
            raise ValueError(f"--out {given} lies inside the model checkpoint {source}; write the engine elsewhere")
        if _within(real_in, real):
            raise ValueError(
                f"--out {given} contains the model checkpoint {source}; replacing it would delete the model"
            )
    if target.is_symlink():
        raise FileExistsError(f"--out {target} is a symbolic link; refusing to replace it (name the directory itself)")
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"--out {target} exists and is not a directory; refusing to replace it")
        if os.path.ismount(target):
            raise ValueError(
                f"--out {target} is a mount point, which cannot be replaced by a rename; name a folder in it"
            )
        if any(target.iterdir()):
            if not force:
                raise FileExistsError(f"--out {target} exists and is not empty; pass --force to replace it")
            why = engine_dir_problem(target)
            if why:
                raise FileExistsError(
                    f"--out {target} exists and is not an engine directory ({why}); refusing to replace it even "
                    "with --force"
                )
    return target


# --- the lock ---------------------------------------------------------------------------------------


class _Lock:
    """An exclusive, non-blocking fcntl.flock on `path`; the holder removes the file when done (a
    build that locks a file already unlinked by a finishing build opens the new one and retries)."""

    def __init__(self, path: Path, target: Path):
        self.path, self.target, self.fd = path, target, None

    def acquire(self) -> None:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                raise BuildLocked(
                    f"--out {self.target}: another apet build (pid {holder or '?'}) is writing it (lock {self.path}); "
                    "wait for it to finish or choose another --out"
                ) from None
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)  # closing releases the flock
        self.fd = None


# --- renames ----------------------------------------------------------------------------------------


def renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2(2): True when done, False where this OS or file system lacks it (the caller
    falls back); other failures raise OSError."""
    if not sys.platform.startswith("linux"):
        return False
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:  # glibc < 2.28
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder of the new engine before it replaces the old one (a power cut
    after the rename must not leave an engine of empty files)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


# --- the writer ---------------------------------------------------------------------------------------


class EngineDirWriter:
    """Builds one engine directory at `out` (see the module docstring). Construct it before the
    build: it checks --out and takes the lock (where the parent exists; else on entering), so a
    second build is refused at once. Use it as a context manager around writing the work directory,
    and call `commit()` as the last step inside it; leaving it (or losing the writer) lets go of the
    lock."""

    def __init__(self, out: str | os.PathLike, *, force: bool = False, inputs: Sequence[str | os.PathLike] = ()):
        self.given, self.force, self.inputs = os.fspath(out), force, tuple(inputs)
        self.out = check_out(out, force=force, inputs=self.inputs)
        parent, name = self.out.parent, self.out.name
        self.work = parent / f".{name}.building"
        self.aside = parent / f".{name}.replaced"
        self._lock = _Lock(parent / f".{name}.lock", self.out)
        self._created: list[Path] = []
        self._committed = False
        weakref.finalize(self, self._lock.release)  # a build that fails before `with` lets go too
        if parent.is_dir():  # a second build to this --out is refused now, not after loading a model
            self._lock.acquire()

    def __enter__(self) -> Path:
        self._created = [p for p in self.out.parents if not p.exists()]  # deepest first
        self.out.parent.mkdir(parents=True, exist_ok=True)
        try:
            if self._lock.fd is None:
                self._lock.acquire()
        except BaseException:
            self._remove_created()
            raise
        try:
            self.recover()
            check_out(self.given, force=self.force, inputs=self.inputs)  # again: a build may have finished meanwhile
            self.work.mkdir()
        except BaseException:
            self._lock.release()
            self._remove_created()
            raise
        return self.work

    def recover(self) -> str | None:
        """Settle what a killed build left (the lock is held): an old engine moved aside with no
        engine at `out` is moved back; one beside a finished replacement is removed; a stale work
        directory is removed. Returns what was done, if anything."""
        done = None
        if self.aside.is_dir() and not self.aside.is_symlink():
            if not self.out.exists() and not self.out.is_symlink():
                os.rename(self.aside, self.out)
                done = f"restored {self.out} from {self.aside.name}, left by an interrupted build"
            else:
                shutil.rmtree(self.aside)
                done = f"removed {self.aside.name}, the old engine of a finished replacement"
            print(f"apet build: {done}", file=sys.stderr)
        if self.work.exists() or self.work.is_symlink():
            _remove(self.work)
        return done

    def commit(self) -> None:
        """Make the work directory the engine at `out` (atomically where the OS can)."""
        _fsync_tree(self.work)
        out, work = self.out, self.work
        if out.exists():
            if renameat2(work, out, RENAME_EXCHANGE):
                self._committed = True
                _fsync(out.parent)
                shutil.rmtree(work, ignore_errors=True)  # the old engine, now at the work name
                return
            os.rename(out, self.aside)
            try:
                os.rename(work, out)
            except BaseException:
                os.rename(self.aside, out)
                raise
            self._committed = True
            _fsync(out.parent)
            shutil.rmtree(self.aside, ignore_errors=True)
            return
        if not renameat2(work, out, RENAME_NOREPLACE):
            os.rename(work, out)
        self._committed = True
        _fsync(out.parent)

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if not self._committed:
                shutil.rmtree(self.work, ignore_errors=True)
        finally:
            self._lock.release()
            if not self._committed:
                self._remove_created()
        return False

    def _remove_created(self) -> None:
        for d in self._created:  # deepest first; only the empty ones this build made
            try:
                d.rmdir()
            except OSError:
                break
