"""Shared setup of the diffusers processor tests: skip without diffusers, guard the global backend."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _global_backend_stays_native():
    """visattn must never flip diffusers' process-global attention backend (diffusers #14249).

    Reads the private registry: tests only. (Test modules skip themselves when diffusers is missing.)
    """
    try:
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    except ImportError:
        yield
        return

    assert _AttentionBackendRegistry._active_backend == AttentionBackendName.NATIVE
    yield
    assert _AttentionBackendRegistry._active_backend == AttentionBackendName.NATIVE, (
        f"the global diffusers attention backend changed to {_AttentionBackendRegistry._active_backend}"
    )


@pytest.fixture(scope="session")
def tiny():
    """``tiny(name)``: a cached tiny model (tests must leave its processors as they found them)."""
    from visattn.pipelines.tiny import tiny_model

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = tiny_model(name)
        return cache[name]

    return get
