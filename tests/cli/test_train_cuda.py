"""``visattn train`` on a GPU with float16 autocast and a GradScaler (Triton kernels, real digits).

The digits come from scikit-learn when it is installed, else from an ImageFolder copy written by
:func:`visattn.cli._data.write_digits_imagefolder` elsewhere and named by ``VISATTN_DIGITS_DIR``
(GPU images without scikit-learn).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from visattn.cli.main import main

pytestmark = pytest.mark.cuda

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "train" / "demo_digits.yaml"


def _data_args() -> list[str]:
    folder = os.environ.get("VISATTN_DIGITS_DIR")
    if folder:
        return ["--dataset", "folder", "--data-dir", folder]
    pytest.importorskip("sklearn", reason="digits need scikit-learn or VISATTN_DIGITS_DIR")
    return []


@pytest.fixture(autouse=True)
def _triton_backend():
    import visattn

    with visattn.use_backend("triton"):  # the GPU path a user gets, not the CLI tests' reference backend
        yield


def test_float16_amp_trains_with_grad_scaler_and_resumes(tmp_path):
    base = ["train", "--config", str(DEMO), *_data_args(), "--output", str(tmp_path), "--no-progress",
            "--device", "cuda", "--amp", "--amp-dtype", "float16", "--batch-size", "64", "--workers", "2",
            "--experiment", "fp16"]
    assert main([*base, "--epochs", "8"]) == 0
    run = tmp_path / "fp16"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_top1"] >= 90.0, summary["best_top1"]
    history = json.loads((run / "metrics.json").read_text())
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    state = torch.load(run / "last.pth.tar", map_location="cpu", weights_only=True)
    scaler = state["amp_scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] >= 0
    # one more epoch from the checkpoint: the scaler state is restored and training continues
    assert main([*base, "--epochs", "9", "--resume", "auto"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_done"] == 9, summary
