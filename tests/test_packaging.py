"""The installed distribution claims one import name, `apet_trt`: the repository's folders `export`,
`runtime` and `scripts` are also names of unrelated PyPI projects, so installed they live under
`apet_trt.` (pyproject.toml maps them) and never as top-level packages."""

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("apet_ops", "export", "runtime", "scripts", "vllm_plugin")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed_under_the_namespace():
    setuptools = _pyproject()["tool"]["setuptools"]
    mapping = setuptools["package-dir"]
    assert mapping == {f"apet_trt.{f}": f for f in FOLDERS}
    on_disk = sorted(
        "apet_trt." + ".".join(init.parent.relative_to(ROOT).parts)
        for folder in FOLDERS
        for init in (ROOT / folder).rglob("__init__.py")
    )
    assert sorted(setuptools["packages"]) == on_disk


def test_no_module_imports_a_folder_by_its_bare_name():
    """Inside the repository `import runtime` would find the folder and load a second copy of it."""
    offenders = []
    for path in [
        *ROOT.glob("apet_ops/**/*.py"),
        *ROOT.glob("export/**/*.py"),
        *ROOT.glob("runtime/**/*.py"),
        *ROOT.glob("scripts/**/*.py"),
        *ROOT.glob("vllm_plugin/**/*.py"),
        *ROOT.glob("tests/**/*.py"),
    ]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in FOLDERS]
    assert offenders == []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the files git tracks or would track: an in-tree build/ would keep stale modules."""
    out, src = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("src")
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for rel in tracked.splitlines():
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    [whl] = out.glob("apet_trt-*.whl")
    return whl


def test_wheel_holds_only_the_apet_trt_namespace(wheel):
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/")[0] for name in zf.namelist()}
        names = set(zf.namelist())
    assert {t for t in tops if not t.endswith(".dist-info")} == {"apet_trt"}
    assert "apet_trt/runtime/__init__.py" in names and "apet_trt/apet_ops/trt_onnx_ops.json" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read(entry_points).decode()
    assert "apet = apet_trt.scripts.cli:main" in text
    # vLLM's plugin group: the entry point's module imports nothing but the standard library
    assert "[vllm.general_plugins]\napet_trt = apet_trt.vllm_plugin:register" in text


def test_installed_from_outside_the_repository(wheel, tmp_path):
    """A regular install (the wheel into its own target) used from a directory outside the repository:
    the API and the CLI entry point resolve to it, the generic names resolve to nothing of ours."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import importlib.util, sys\n"
        "from apet_trt import runtime\n"
        "from apet_trt.scripts.cli import main\n"
        f"assert runtime.__file__.startswith({str(target)!r}), runtime.__file__\n"
        "assert callable(runtime.load)\n"
        "for name in ('runtime', 'export', 'scripts', 'apet_ops'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        f"    assert spec is None or not (spec.origin or '').startswith(({str(ROOT)!r}, {str(target)!r})), spec\n"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    help_text = subprocess.run(
        [sys.executable, "-m", "apet_trt.scripts.cli", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert help_text.returncode == 0 and "build" in help_text.stdout and "run" in help_text.stdout


def test_the_vllm_plugin_entry_point_imports_only_the_standard_library():
    """vLLM imports `apet_trt.vllm_plugin` in each of its processes (its entry point): that module must
    load without torch, vLLM or the rest of apet-trt (the model class loads only when vLLM builds it)."""
    code = (
        "import sys\n"
        "import apet_trt.vllm_plugin as p\n"
        "assert callable(p.register) and p.ARCHITECTURE.endswith('ForConditionalGeneration')\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm', 'numpy', 'transformers')\n"
        "               or (m.startswith('apet_trt.') and not m.startswith('apet_trt.vllm_plugin')))\n"
        "assert heavy == [], heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
