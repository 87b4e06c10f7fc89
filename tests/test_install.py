"""The README's first command installs tierd with tools/install.sh: it must leave working commands behind."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(os.geteuid() != 0, reason="install.sh may install python3-venv with apt: needs root")
def test_install_script_leaves_working_commands(tmp_path: Path) -> None:
    env = {**os.environ, "PREFIX": str(tmp_path / "venv"), "BIN": str(tmp_path / "bin")}
    r = subprocess.run(["sh", str(REPO / "tools/install.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "bin/tierd").resolve() == (tmp_path / "venv/bin/tierd").resolve()
    r = subprocess.run([str(tmp_path / "bin/tierctl"), "nodes", "--json"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["schema"] == "tierd.nodes/v1"
