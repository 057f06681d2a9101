"""Shared test setup: run the real Triton kernels on the CPU when there is no GPU.

Triton decides at ``@triton.jit`` decoration time whether a kernel is compiled or interpreted, so
``TRITON_INTERPRET=1`` must be in the environment before ``visattn.kernels`` is first imported.
Importing torch (and visattn) defines no kernel, so checking for CUDA first is safe.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # every cached launch is checked against Triton's own binding (kernels/_launch.py)
    os.environ.setdefault("VISATTN_CHECK_LAUNCH", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same random state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture
def device() -> torch.device:
    """The device the kernels run on: the GPU when there is one, else the CPU (Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_report_header(config) -> str:
    return f"visattn tests: TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}, cuda={torch.cuda.is_available()}"
