"""The checkpoint's remote code (the files of modeling/ and kernels/): where it lives, and importing it.

A checkpoint holds these files side by side in one folder, and they import each other with `from .x import y`.
The converter and the tests import the very same files the same way, as one flat package whose search path is
both folders, so there is one copy of every piece of math.
"""

import importlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACKAGE = "starkv_remote"
_HERE = Path(__file__).resolve().parent


def remote_code_dirs() -> list[Path]:
    """modeling/ and kernels/: inside the installed package (wheel) or beside it (source checkout)."""
    dirs = []
    for name in ("modeling", "kernels"):
        for candidate in (_HERE / name, _HERE.parent / name):
            if candidate.is_dir():
                dirs.append(candidate)
                break
    if not dirs or dirs[0].name != "modeling":
        raise RuntimeError(f"starkv's modeling/ folder is missing next to {_HERE}: reinstall starkv")
    return dirs


def remote_code_files() -> list[Path]:
    """Every Python file a checkpoint needs, in copy order."""
    return [p for d in remote_code_dirs() for p in sorted(d.glob("*.py")) if not p.name.startswith("_")]


def import_remote(module: str = "modeling_starkv") -> ModuleType:
    """Imports `module` of the remote code (e.g. "modeling_starkv", "configuration_starkv")."""
    if PACKAGE not in sys.modules:
        spec = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
        spec.submodule_search_locations = [str(d) for d in remote_code_dirs()]
        sys.modules[PACKAGE] = importlib.util.module_from_spec(spec)
    return importlib.import_module(f"{PACKAGE}.{module}")
