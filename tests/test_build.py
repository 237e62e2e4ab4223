"""The compiled request path: built from the .py files by `pip install`, loaded instead
of them, and a clear install error where no C compiler is found (setup.py)."""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import proxyd.ops
import proxyd.protocol
import proxyd.server
from tests.proxyclient import CHECKOUT

COMPILED = [proxyd.protocol, proxyd.ops, proxyd.server]


@pytest.mark.parametrize("module", COMPILED, ids=lambda m: m.__name__)
def test_request_path_runs_compiled_and_up_to_date(module) -> None:
    path = Path(module.__file__)
    assert path.name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), path
    source = path.with_name(module.__name__.rsplit(".", 1)[1] + ".py")
    # A compiled module older than its source would run code nobody reads (an editable
    # install runs the .so until `pip install -e .` builds it again).
    assert path.stat().st_mtime >= source.stat().st_mtime, f"{path} is older than {source}"


def test_install_without_a_compiler_fails_saying_what_to_install(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(CHECKOUT / name, source / name)
    (source / "proxyd").mkdir()
    for path in (CHECKOUT / "proxyd").iterdir():
        if path.suffix in (".py", ".pxd"):
            shutil.copy2(path, source / "proxyd" / path.name)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "-w",
            str(tmp_path / "wheels"),
            str(source),
        ],
        env={**os.environ, "CC": str(tmp_path / "no-such-cc")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "proxyd: cannot compile its request path" in output, output[-3000:]
    assert "apt-get install build-essential python3-dev" in output
    assert not list(tmp_path.glob("wheels/*.whl"))
