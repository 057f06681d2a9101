"""Backbone tests run offline (no test may reach the Hugging Face Hub, specs/timm.md §7), on the torch
backend, with one intra-op thread.

One thread: the contract runs thousands of small ops (padded 7x7 maps, the reference's masks); with
more threads than free cores each op's OpenMP region waits for descheduled threads. Measured on the
shared 2-core CI box (load 11): a nat_base forward at 32 px took 20 s wall with 2 threads and 1.2 s
with 1. ``VISATTN_TEST_THREADS`` overrides it.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _offline_torch_backend(monkeypatch):
    """HF_HUB_OFFLINE=1 (also patched into huggingface_hub if it was imported first) and the torch backend."""
    import visattn

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        import huggingface_hub.constants as hf_constants

        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True, raising=False)
    except ImportError:
        pass
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("VISATTN_TEST_THREADS", "1")))
    try:
        with visattn.use_backend("torch"):
            yield
    finally:
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """The timm contract runs model by model, so each model's default build is shared (``_contract``)."""
    from ._contract import order_by_model

    order_by_model(items)
