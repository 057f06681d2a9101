"""PSA's and Rectified SpaAttn's Triton kernels compile for sm_90 (no GPU needed): the interpreter alone accepts code the
compiler rejects. Runs ``_pyramid_compile.py`` in a subprocess without ``TRITON_INTERPRET``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

NO_SPILL = {"estimator", "estimator_perm", "gather_rows", "tile_order", "planner", "rect_stats", "rect_scores_wan",
            "rect_scores_text", "rect_rows_1024", "rect_rows_2048"}


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, str(Path(__file__).with_name("_pyramid_compile.py"))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert res.stdout.count("OK ") == 23, res.stdout
    for line in res.stdout.splitlines():
        _, name, _, local_decls, stack = line.split()
        assert local_decls == "0", line  # no local-memory arrays in the PTX
        # no register spills in the SASS of the planning kernels (a spilling Rectified planner ran 9x
        # slower on an H100); -1: cuobjdump not shipped with this Triton
        if name in NO_SPILL:
            assert int(stack) <= 0, line
