"""The neighborhood forward and dQ kernels compile for sm_90 at the GPU's tiles (no GPU needed): the
interpreter runs small boxes only and accepts code the compiler rejects. Runs ``_neighborhood_compile.py`` in
a subprocess without ``TRITON_INTERPRET``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_neighborhood_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, str(Path(__file__).with_name("_neighborhood_compile.py"))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert res.stdout.count("OK ") == 4, res.stdout
    for line in res.stdout.splitlines():
        assert line.split()[3] == "0", line  # no local-memory arrays in the PTX
