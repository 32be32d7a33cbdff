"""Every TensorRT / Polygraphy / TensorRT-LLM name the package calls exists in the installed version.

TensorRT 11 removed the weak-typing API (ILayer.precision, set_output_type, BuilderFlag.FP16,
precision constraints); the next removal should fail here on first install, not in a user's build.
The package's source is read with `ast`, so a name added to the code is checked without editing
this file:

  polygraphy    every name imported from polygraphy exists, and every keyword the package passes
                to it is a parameter of the installed signature (runs here: polygraphy is in the
                test extra); CreateConfig gets no precision keyword
  weak typing   none of the removed names appears anywhere in the package
  tensorrt      every `trt.X.Y` the package reads, the dtypes the runtime maps, and the engine /
                context / network methods it calls exist (where tensorrt imports)
  tensorrt_llm  ModelRunnerCpp.from_dir / generate (and its `random_seed` keyword), LLM and
                SamplingParams as the decoders call them (where tensorrt_llm imports)
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ("apet_ops", "export", "runtime", "scripts")


def package_sources() -> dict[str, ast.Module]:
    files = sorted(p for d in PACKAGE_DIRS for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 20
    return {str(p.relative_to(ROOT)): ast.parse(p.read_text(), filename=str(p)) for p in files}


SOURCES = package_sources()


# --- Polygraphy ----------------------------------------------------------------------------------


def polygraphy_imports() -> dict[str, object]:
    """local name -> the object, for every `from polygraphy... import X` in the package."""
    found = {}
    for tree in SOURCES.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("polygraphy"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
                    found[alias.asname or alias.name] = getattr(module, alias.name)
    return found


def parameters(obj) -> set[str]:
    """Keyword names `obj(...)` takes; for a class, its __init__ and those of the bases its
    **kwargs are passed on to."""
    names = set()
    for target in (c.__init__ for c in inspect.getmro(obj) if "__init__" in vars(c)) if inspect.isclass(obj) else [obj]:
        params = inspect.signature(target).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break  # **kwargs goes no further
    return names


def polygraphy_calls(imported: dict) -> list[tuple[str, object, list[str]]]:
    """(where, callee, keywords) for every call of an imported Polygraphy name, of a method on one
    (Comparator.run) or on an instance made on the spot (Profile().add)."""
    calls = []
    for path, tree in SOURCES.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func, callee = node.func, None
            if isinstance(func, ast.Name) and func.id in imported:
                callee = imported[func.id]
            elif isinstance(func, ast.Attribute):
                base = func.value
                if isinstance(base, ast.Call) and isinstance(base.func, ast.Name):
                    base = base.func  # Profile().add -> Profile.add
                if isinstance(base, ast.Name) and base.id in imported:
                    owner = imported[base.id]
                    assert hasattr(owner, func.attr), f"{path}:{node.lineno}: {base.id} has no {func.attr}"
                    callee = getattr(owner, func.attr)
            if callee is not None:
                calls.append((f"{path}:{node.lineno}", callee, [k.arg for k in node.keywords if k.arg]))
    return calls


def test_polygraphy_names_and_keywords_exist_in_the_installed_version():
    pytest.importorskip("polygraphy", reason="polygraphy is in the test extra; install it to check its API")
    imported = polygraphy_imports()
    assert {"NetworkFromOnnxPath", "CreateConfig", "EngineFromNetwork", "Comparator"} <= set(imported)
    calls = polygraphy_calls(imported)
    assert len(calls) >= 10, calls
    for where, callee, keywords in calls:
        unknown = set(keywords) - parameters(callee)
        assert not unknown, f"{where}: {getattr(callee, '__qualname__', callee)} takes no {sorted(unknown)}"
    # the two this issue is about, stated outright
    assert "strongly_typed" in parameters(imported["NetworkFromOnnxPath"])
    create = [kw for _, callee, kw in calls if callee is imported["CreateConfig"]]
    assert create and not {k for kw in create for k in kw} & {
        "fp16",
        "bf16",
        "int8",
        "fp8",
        "tf32",
        "precision_constraints",
    }


# --- the weak-typing API is gone ------------------------------------------------------------------

WEAK_TYPING = {
    "layer precision": r"\.precision\s*=[^=]",
    "set_output_type": r"\bset_output_type\b",
    "BuilderFlag.FP16 / BF16": r"BuilderFlag\.(FP16|BF16|INT8|FP8|TF32)\b",
    "precision constraints": r"precision_constraints|(OBEY|PREFER)_PRECISION_CONSTRAINTS",
    "CreateConfig(fp16=...)": r"CreateConfig\([^)]*\b(fp16|bf16)\s*=",
}


@pytest.mark.parametrize("what", sorted(WEAK_TYPING))
def test_no_weak_typing_api_in_the_package(what):
    pattern = re.compile(WEAK_TYPING[what], re.S)
    hits = [path for path in SOURCES if pattern.search((ROOT / path).read_text())]
    assert hits == [], f"{what} used in {hits}"


def test_the_weak_typing_scan_finds_what_it_looks_for():
    """The patterns above match the code this project had before TensorRT 11 (and would again)."""
    old = (
        "layer.precision = trt.float32\nlayer.set_output_type(j, trt.float32)\n"
        'CreateConfig(\n fp16=fp16, precision_constraints="obey")'
    )
    assert all(re.search(p, old, re.S) for w, p in WEAK_TYPING.items() if w != "BuilderFlag.FP16 / BF16")
    assert re.search(WEAK_TYPING["BuilderFlag.FP16 / BF16"], "config.set_flag(trt.BuilderFlag.FP16)")
    assert not re.search(WEAK_TYPING["layer precision"], "if layer.precision == x")


# --- TensorRT -----------------------------------------------------------------------------------


def trt_attribute_chains() -> set[str]:
    """'Logger.WARNING', 'Runtime', ... for every `trt.<chain>` in modules that `import tensorrt as trt`."""
    chains = set()
    for tree in SOURCES.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):  # inner links of a chain come out as its prefixes
                parts, base = [], node
                while isinstance(base, ast.Attribute):
                    parts.append(base.attr)
                    base = base.value
                if isinstance(base, ast.Name) and base.id == "trt":
                    chains.add(".".join(reversed(parts)))
    return chains


# methods and properties called on TensorRT objects (runtime/backends/tensorrt.py, export/tensorrt_build.py)
TRT_MEMBERS = {
    "Runtime": ["deserialize_cuda_engine"],
    "ICudaEngine": [
        "num_io_tensors",
        "get_tensor_name",
        "get_tensor_mode",
        "get_tensor_dtype",
        "get_tensor_shape",
        "create_execution_context",
    ],
    "IExecutionContext": ["set_input_shape", "get_tensor_shape", "set_tensor_address", "execute_async_v3"],
    "INetworkDefinition": ["get_flag"],
}


def test_tensorrt_names_exist_in_the_installed_version():
    trt = pytest.importorskip(
        "tensorrt",
        reason="TensorRT is not installable on this CPU-only machine (needs an NVIDIA GPU and the "
        "tensorrt wheel); this check runs wherever it imports",
    )
    from apet_trt.runtime.backends.tensorrt import TORCH_DTYPES

    chains = trt_attribute_chains()
    assert {"Logger.WARNING", "Runtime", "TensorIOMode.INPUT", "NetworkDefinitionCreationFlag"} <= chains, chains
    for chain in sorted(chains):
        obj = trt
        for part in chain.split("."):
            assert hasattr(obj, part), f"tensorrt {trt.__version__} has no trt.{chain}"
            obj = getattr(obj, part)
    for name in TORCH_DTYPES:  # the runtime maps engine tensor types through getattr(trt, name)
        assert hasattr(trt, name), f"tensorrt {trt.__version__} has no trt.{name}"
    for cls, members in TRT_MEMBERS.items():
        for member in members:
            assert hasattr(getattr(trt, cls), member), f"tensorrt {trt.__version__}: {cls} has no {member}"
    major = int(trt.__version__.split(".")[0])
    assert major >= 11 or hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    # and the weak-typing API really is gone on 11.x (so nothing here may come to rely on it)
    if major >= 11:
        assert not hasattr(trt.BuilderFlag, "FP16") and not hasattr(trt.ILayer, "set_output_type")


# --- TensorRT-LLM -------------------------------------------------------------------------------


def test_tensorrt_llm_names_exist_in_the_installed_version():
    pytest.importorskip(
        "tensorrt_llm",
        reason="TensorRT-LLM is not installable on this CPU-only machine (needs an NVIDIA GPU); "
        "this check runs wherever it imports",
    )
    from tensorrt_llm import LLM, SamplingParams
    from tensorrt_llm.runtime import ModelRunnerCpp

    assert {"engine_dir", "rank"} <= set(inspect.signature(ModelRunnerCpp.from_dir).parameters)
    generate = inspect.signature(ModelRunnerCpp.generate).parameters
    for name in ("prompt_table", "prompt_tasks", "max_new_tokens", "end_id", "pad_id", "streaming", "return_dict"):
        assert name in generate, f"ModelRunnerCpp.generate takes no {name}"
    # the sampling keywords go through **kwargs: generate keeps those it lists as accepted and
    # renames random_seed to the executor SamplingConfig's seed; an unlisted one is dropped silently
    source = inspect.getsource(ModelRunnerCpp.generate)
    for name in ("temperature", "top_k", "top_p", "random_seed"):
        assert f'"{name}"' in source, f"ModelRunnerCpp.generate no longer accepts {name}"
    assert "model" in inspect.signature(LLM).parameters
    assert {"max_tokens", "temperature", "top_k", "top_p", "seed"} <= set(inspect.signature(SamplingParams).parameters)
