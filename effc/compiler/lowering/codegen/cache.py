"""Generated kernels cached by source hash: in memory, and as modules on disk.

Triton's `@triton.jit` reads a kernel's source with `inspect`, so generated code must live in a
real file. The hash is taken over the code without its docstring and comments (which name the
FX nodes of one graph), so the same kernel in every layer and every graph is one module: it is
written once to `<cache dir>/<name>_<hash>.py` (atomically, so processes can share the
directory), imported, and kept in memory under its hash. The directory is the `cache_dir` option, else `EFFC_CACHE_DIR`, else ~/.cache/effc/kernels.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

_MODULES: dict[str, ModuleType] = {}
_lock = threading.Lock()
STATS = {"memory_hits": 0, "disk_hits": 0, "writes": 0}


def cache_dir(option: str | None = None) -> Path:
    """Where generated modules go: the option, else EFFC_CACHE_DIR, else ~/.cache/effc/kernels."""
    chosen = option or os.environ.get("EFFC_CACHE_DIR")
    return Path(chosen).expanduser() if chosen else Path.home() / ".cache" / "effc" / "kernels"


def canonical(text: str) -> str:
    """The code of a generated module without its docstring, comments and blank lines."""
    if text.startswith('"""'):
        text = text.split('"""', 2)[2]
    lines = (re.sub(r"\s*#.*$", "", line).rstrip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def source_hash(text: str) -> str:
    return hashlib.sha256(canonical(text).encode()).hexdigest()[:20]


def _write_once(path: Path, text: str) -> bool:
    """Write `text` to `path` unless a file for the same code is there; True if written."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return True


def load(text: str, name: str, directory: str | os.PathLike | None = None) -> Any:
    """The jit function `name` defined by source `text` (imported once per distinct source)."""
    key = source_hash(text)
    with _lock:
        module = _MODULES.get(key)
        if module is not None:
            STATS["memory_hits"] += 1
            return getattr(module, name)
        path = cache_dir(directory) / f"{name}_{key}.py"
        if _write_once(path, text):
            STATS["writes"] += 1
        else:
            STATS["disk_hits"] += 1
        module_name = f"effc_generated.{name}_{key}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # inspect.getsource looks modules up here
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
        _MODULES[key] = module
        return getattr(module, name)


def clear_memory() -> None:
    """Forget imported modules (the disk cache stays); tests use it to exercise disk hits."""
    with _lock:
        _MODULES.clear()
