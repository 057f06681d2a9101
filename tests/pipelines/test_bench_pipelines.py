"""Smoke test of benchmarks/bench_pipelines.py: the real Wan2.1-1.3B block shapes, 1 layer, tiny video."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")  # the diffusers extra; installed in CI through the test extra


def test_bench_pipelines_wan_one_layer(tmp_path):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_pipelines.py"
    spec = importlib.util.spec_from_file_location("bench_pipelines", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(
        [
            "--model",
            "wan",
            "--layers",
            "1",
            "--frames",
            "5",
            "--height",
            "64",
            "--width",
            "64",
            "--dtype",
            "fp32",
            "--text-len",
            "8",
            "--rep",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
            "--set",
            "backend=torch",
            "--set",
            "kernel_size=[1,3,3]",
            "--set",
            "stride=1",
        ]
    )
    assert rc == 0
    rep = json.loads((tmp_path / "pipelines_wan_cpu.json").read_text())
    rows = {r["method"]: r for r in rep["rows"]}
    assert set(rows) == {"diffusers default", "dense", "neighborhood"}
    nb = rows["neighborhood"]
    assert nb["fallbacks"] == {} and nb["calls"] == 1 and 0 < nb["density"] < 1 and nb["attention_ms"] > 0
    assert "21" not in str(nb["layouts"]) and "(2, 4, 4)" in str(nb["layouts"])
    assert (tmp_path / "pipelines_wan_cpu.md").is_file()
