"""Loading a script under tools/ as a module, for its tests (tools/guest.py shares its name with the tools/guest/
package, so it cannot be imported by name)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(script: str, module_name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, TOOLS / script)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod
