"""Backbone tests run offline: no test may reach the Hugging Face Hub (specs/timm.md §7)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402


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
    with visattn.use_backend("torch"):
        yield
