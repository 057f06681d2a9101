"""CLI tests run models as a CPU user would: on visattn's reference ("torch") backend.

The top-level conftest sets ``TRITON_INTERPRET=1`` so that kernel tests run the real Triton kernels on
the CPU; under it ``"auto"`` would pick those (slow) interpreted kernels for every attention layer of a
training run, which is not what a CPU user without that variable gets.
"""

from __future__ import annotations

import pytest

import visattn


@pytest.fixture(autouse=True)
def _reference_backend():
    with visattn.use_backend("torch"):
        yield
