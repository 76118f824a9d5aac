"""No code under sdrm/ or services/ can unpickle: weights load from safetensors only.

A static scan of the syntax trees rejects imports of pickle and its relatives and calls that
unpickle (torch.load, torch.jit.load, numpy.load with allow_pickle=True, pandas.read_pickle).
A checkpoint test shows that a pickle planted in a checkpoint directory is never executed.
"""

from __future__ import annotations

import ast
import json
import pickle
import shutil
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
SCANNED = (REPOSITORY / "sdrm", REPOSITORY / "services")
UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve"}
UNPICKLING_CALLS = {"torch.load", "torch.jit.load", "read_pickle"}
NUMPY_LOADS = {"np.load", "numpy.load"}


def dotted_name(node: ast.AST) -> str:
    """Return 'a.b.c' for a Name or Attribute chain, else ''."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def unpickling_uses(source: str, filename: str = "<source>") -> list[str]:
    """Return 'file:line: what' for each import or call in source that can unpickle."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNPICKLING_MODULES:
                    found.append(f"{filename}:{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in UNPICKLING_MODULES:
            found.append(f"{filename}:{node.lineno}: from {node.module} import")
        elif isinstance(node, ast.Call):
            name = dotted_name(node.func)
            if name in UNPICKLING_CALLS or name.endswith(".read_pickle"):
                found.append(f"{filename}:{node.lineno}: {name}()")
            allow_pickle = any(
                keyword.arg == "allow_pickle" and not (isinstance(keyword.value, ast.Constant) and keyword.value.value is False)
                for keyword in node.keywords
            )
            if name in NUMPY_LOADS and allow_pickle:
                found.append(f"{filename}:{node.lineno}: {name}(allow_pickle=...)")
    return found


def test_no_unpickling_in_library_and_services():
    offenders = []
    for folder in SCANNED:
        for path in sorted(folder.rglob("*.py")):
            offenders += unpickling_uses(path.read_text(encoding="utf-8"), str(path.relative_to(REPOSITORY)))
    assert offenders == []


@pytest.mark.parametrize(
    "source",
    [
        "import pickle",
        "import joblib as jl",
        "from pickle import loads",
        "import torch\ntorch.load('model.pt')",
        "import torch\ntorch.jit.load('model.pt')",
        "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
        "import pandas as pd\npd.read_pickle('a.pkl')",
    ],
)
def test_scan_finds_unpickling(source):
    assert unpickling_uses(source)


def test_scan_allows_safe_loads():
    assert unpickling_uses("import numpy as np\nnp.load('a.npy')\nnp.load('a.npy', allow_pickle=False)") == []


class _Marker:
    """Unpickling this object creates a file, so a test can see whether anything unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture()
def shipped_manifest() -> Path:
    path = REPOSITORY / "models" / "deeppcb-sdrm" / "manifest.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def test_checkpoint_loads_from_safetensors(shipped_manifest):
    from sdrm.checkpoint import WEIGHTS, load_checkpoint

    model, manifest = load_checkpoint(shipped_manifest.parent)
    assert (shipped_manifest.parent / WEIGHTS).read_bytes()[8:9] == b"{"  # safetensors: u64 header length, JSON header
    assert manifest["architecture"] == json.loads(shipped_manifest.read_text())["architecture"]
    assert sum(parameter.numel() for parameter in model.parameters()) > 0


def test_marker_detects_unpickling(tmp_path):
    marker = tmp_path / "unpickled"
    pickle.loads(pickle.dumps(_Marker(marker)))
    assert marker.exists()


def test_pickled_weights_never_unpickled(shipped_manifest, tmp_path):
    from sdrm.checkpoint import WEIGHTS, load_checkpoint

    marker = tmp_path / "unpickled"
    shutil.copy(shipped_manifest, tmp_path / "manifest.json")
    (tmp_path / "model.pt").write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(FileNotFoundError, match=WEIGHTS):
        load_checkpoint(tmp_path)
    assert not marker.exists()

    (tmp_path / WEIGHTS).write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(Exception, match="deserializing header"):
        load_checkpoint(tmp_path)
    assert not marker.exists()
