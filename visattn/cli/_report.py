"""Run records of ``visattn train``: per-epoch metrics as JSON and CSV, a PNG of the curves, summary.json.

Accuracies are percentages (0-100), as timm's ``accuracy`` returns them; ``summary.json`` says so in
its ``accuracy_unit`` field. Files are replaced atomically so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    _write_text(out / "metrics.json", json.dumps(history, indent=1) + "\n")
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    _write_text(out / "metrics.csv", buf.getvalue())


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    _write_text(out / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")


def plot_curves(out: Path, history: list[dict[str, Any]]) -> Path | None:
    """``curves.png``: training/validation loss and validation top-1 per epoch; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ep = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(ep, [r["train_loss"] for r in history], "o-", label="train loss")
    a.plot(ep, [r["val_loss"] for r in history], "o-", label="val loss")
    b.plot(ep, [r["top1"] for r in history], "o-", label="val top-1")
    if history and "ema_top1" in history[0]:
        b.plot(ep, [r["ema_top1"] for r in history], "o-", label="EMA val top-1")
    a.set_xlabel("epoch")
    b.set_xlabel("epoch")
    b.set_ylabel("top-1 (%)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / "curves.png"
    tmp = out / f".curves.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path
