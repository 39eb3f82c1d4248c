"""Running a test file's Triton kernel tests on the CPU: a child pytest with ``TRITON_INTERPRET=1``.

The interpreter must be chosen before triton is first imported, so each kernel test file has one parent test that
re-runs the file in a child process; tests marked ``in_child`` run only there, ``in_parent`` ones only outside.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
ROOT = Path(__file__).resolve().parents[1]
in_child = pytest.mark.skipif(not INTERPRET, reason="runs in the TRITON_INTERPRET=1 child process")
in_parent = pytest.mark.skipif(INTERPRET, reason="runs in the parent process, without the interpreter")
parent_only = pytest.mark.skipif(INTERPRET or not HAS_TRITON, reason="this is the parent; needs triton installed")


def run_under_interpreter(test_file: str, *pytest_args: str, env: dict[str, str] | None = None) -> None:
    """Run ``test_file``'s tests (narrowed by ``pytest_args``) in a child pytest under the interpreter; assert it
    passed, showing the tail of its output otherwise."""
    env = {**os.environ, **(env or {}), "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *pytest_args, str(test_file)]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and " passed" in res.stdout, res.stdout[-6000:] + res.stderr[-3000:]
