"""Print versions, devices and each backend's availability with its reasons."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform

NAME = "info"
HELP = "versions, devices and backend availability"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    import torch

    import visattn
    from visattn.ops import _dispatch

    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            devices.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    return {
        "visattn": visattn.__version__,
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in ("torch", "triton", "timm", "diffusers", "natten")},
        "cuda": torch.version.cuda,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0"),
        "devices": devices,
        "backends": _dispatch.environment_reasons(),
        "ops": _dispatch.list_backends(),
    }


def run(args: argparse.Namespace) -> int:
    info = collect()
    print(f"visattn {info['visattn']} (python {info['python']})")
    for name, ver in info["versions"].items():
        print(f"  {name:<10} {ver}")
    print(f"  cuda       {info['cuda']}")
    print(f"  TRITON_INTERPRET={info['TRITON_INTERPRET']}")
    print("devices:")
    for d in info["devices"]:
        print(f"  {d}")
    print("backends:")
    for name, reasons in info["backends"].items():
        status = "available" if not reasons else "unavailable: " + "; ".join(reasons)
        print(f"  {name:<7} {status}")
    print("ops:")
    for op, names in info["ops"].items():
        print(f"  {op:<13} {', '.join(names)}")
    return 0
