"""Tests of the backend registry and selection (``visattn.ops._dispatch``)."""

from __future__ import annotations

import logging
import re

import pytest
import torch

import visattn
from visattn import BlockSparsePlan
from visattn.kernels import _common as _kernel_common  # defines no kernel; holds the INTERPRET flag
from visattn.ops import _dispatch

CPU = torch.device("cpu")


@pytest.fixture
def fresh_env(monkeypatch):
    """Monkeypatch the environment facts the Triton checks read, and drop their per-process cache.

    ``triton_reasons`` may cache its answers per device and ``TRITON_INTERPRET`` value; an empty cache
    (restored afterwards) makes it re-read the patched facts and keeps them out of later tests.
    """
    monkeypatch.setattr(_dispatch, "_ENV_REASONS", {}, raising=False)
    return monkeypatch


def _inputs(dtype=torch.float32):
    q, k, v = (torch.randn(1, 40, 2, 16, dtype=dtype) for _ in range(3))
    return q, k, v, BlockSparsePlan.dense(40, 40, 16, 16)


def test_list_backends():
    assert visattn.list_backends()["block_sparse"] == ["triton", "torch", "flex"]  # "auto" priority order
    assert visattn.list_backends("block_sparse") == {"block_sparse": ["triton", "torch", "flex"]}
    assert visattn.list_backends("no_such_op") == {"no_such_op": []}


def test_auto_on_cpu_picks_triton_under_the_interpreter(fresh_env):
    fresh_env.setenv("TRITON_INTERPRET", "1")
    fresh_env.setattr(_kernel_common, "INTERPRET", True)  # as if the kernels were defined under it
    assert _dispatch.select("block_sparse", "auto", CPU, "", *_inputs()).name == "triton"
    assert _dispatch.select("block_sparse", None, CPU, "", *_inputs()).name == "triton"


def test_auto_on_cpu_falls_back_to_the_reference_and_logs_it(fresh_env, caplog):
    fresh_env.setenv("TRITON_INTERPRET", "0")
    fresh_env.setattr(_dispatch, "_LOGGED_REFERENCE", set())
    with caplog.at_level(logging.INFO, logger="visattn"):
        chosen = _dispatch.select("block_sparse", "auto", CPU, "", *_inputs())
    assert chosen.name == "torch"
    assert any("runs on the 'torch' backend for cpu tensors" in r.getMessage() for r in caplog.records), caplog.text


def test_float64_on_cpu_falls_through_to_the_reference():
    assert _dispatch.select("block_sparse", "auto", CPU, "", *_inputs(torch.float64)).name == "torch"


def test_triton_named_on_cpu_without_interpreter_gives_the_reason(fresh_env):
    fresh_env.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(NotImplementedError, match=re.escape("set TRITON_INTERPRET=1 to run the kernels")):
        _dispatch.select("block_sparse", "triton", CPU, "", *_inputs())


def test_interpreter_set_too_late_is_explained(fresh_env):
    fresh_env.setenv("TRITON_INTERPRET", "1")
    fresh_env.setattr(_kernel_common, "INTERPRET", False)  # kernels were compiled before it was set
    reasons = _dispatch.triton_reasons(CPU)
    assert len(reasons) == 1 and "was set after visattn's Triton kernels were compiled" in reasons[0]


def test_triton_on_a_cuda_device_under_the_interpreter_is_refused(fresh_env):
    fresh_env.setenv("TRITON_INTERPRET", "1")
    fresh_env.setattr(torch.cuda, "get_device_capability", lambda *a, **kw: (9, 0))  # no GPU needed here
    reasons = _dispatch.triton_reasons(torch.device("cuda"))
    assert any("runs kernels on the CPU only" in r for r in reasons), reasons


def test_reference_is_never_auto_picked_for_cuda(monkeypatch):
    # pretend Triton cannot run: "auto" must then fail on a CUDA device instead of using the reference
    triton = _dispatch._REGISTRY["block_sparse"]["triton"]
    monkeypatch.setattr(triton, "can_run", lambda *a, **kw: ["pretend: no usable GPU"])
    with pytest.raises(NotImplementedError) as info:
        _dispatch.select("block_sparse", "auto", torch.device("cuda"), "SUMMARY", *_inputs())
    msg = str(info.value)
    assert msg.splitlines()[:2] == [
        "No visattn backend can run block sparse attention for these inputs.",
        "  inputs: SUMMARY",
    ]
    assert "  backend 'triton':\n    - pretend: no usable GPU" in msg
    assert ("  backend 'torch':\n    - 'auto' picks the 'torch' backend only for cpu tensors, got device=cuda; "
            "pass backend='torch' to run it there on purpose") in msg
    assert "backend 'flex'" not in msg
    # the same inputs on the CPU do get the reference
    assert _dispatch.select("block_sparse", "auto", CPU, "", *_inputs()).name == "torch"


def test_summary_callable_is_built_only_for_an_error(monkeypatch):
    calls = []

    def summary():
        calls.append(1)
        return "LAZY SUMMARY"

    assert _dispatch.select("block_sparse", "torch", CPU, summary, *_inputs()).name == "torch"
    assert calls == []  # a successful selection formats nothing
    triton = _dispatch._REGISTRY["block_sparse"]["triton"]
    monkeypatch.setattr(triton, "can_run", lambda *a, **kw: ["pretend: no usable GPU"])
    with pytest.raises(NotImplementedError, match="  inputs: LAZY SUMMARY\n  backend 'triton'"):
        _dispatch.select("block_sparse", "triton", CPU, summary, *_inputs())
    assert calls == [1]


@pytest.fixture
def fake_op():
    """A made-up op with three backends, removed from the registry afterwards."""
    calls = []
    state = {"a": [], "b": [], "c": [], "a_auto": [], "checked": []}
    names = {"a": "triton", "b": "torch", "c": "flex"}

    def can_run(*a, _k):
        state["checked"].append(_k)
        return list(state[_k])

    for key, auto, devices in (("a", True, None), ("b", True, ("cpu",)), ("c", False, None)):
        auto_if = (lambda *a: list(state["a_auto"])) if key == "a" else None
        _dispatch.register_backend("_test_op", names[key], can_run=lambda *a, _k=key: can_run(*a, _k=_k),
                                   auto=auto, auto_devices=devices, auto_if=auto_if)(
            lambda *a, _k=key: calls.append(_k))
    yield state
    _dispatch._REGISTRY.pop("_test_op", None)
    _dispatch._LOGGED_REFERENCE.discard("_test_op")


def test_fake_op_priority_and_auto_flags(fake_op):
    assert visattn.list_backends("_test_op") == {"_test_op": ["triton", "torch", "flex"]}
    assert _dispatch.select("_test_op", "auto", CPU, "").name == "triton"
    fake_op["a"] = ["a cannot"]
    assert _dispatch.select("_test_op", "auto", CPU, "").name == "torch"
    fake_op["b"] = ["b cannot"]
    # "flex" can run but is not an "auto" backend: nothing is picked
    with pytest.raises(NotImplementedError) as info:
        _dispatch.select("_test_op", "auto", CPU, "in")
    msg = str(info.value)
    assert msg.splitlines()[0].endswith("test op attention for these inputs.")
    assert "backend 'triton':\n    - a cannot" in msg and "backend 'torch':\n    - b cannot" in msg
    assert "flex" not in msg
    assert _dispatch.select("_test_op", "flex", CPU, "").name == "flex"


def test_fake_op_auto_if_passes_over_a_backend_that_can_run(fake_op):
    # a speed rule: "auto" takes the next backend, the rule's reasons appear if nothing runs, and the
    # backend still runs when it is named
    fake_op["a_auto"] = ["slower here"]
    assert _dispatch.select("_test_op", "auto", CPU, "").name == "torch"
    assert fake_op["checked"] == ["b"]  # the rule is asked first and spares "a"'s capability check
    assert _dispatch.select("_test_op", "triton", CPU, "").name == "triton"
    fake_op["b"] = ["b cannot"]
    with pytest.raises(NotImplementedError, match="backend 'triton':\n    - slower here"):
        _dispatch.select("_test_op", "auto", CPU, "in")
    fake_op["a_auto"] = []
    assert _dispatch.select("_test_op", "auto", CPU, "").name == "triton"


def test_fake_op_named_backend_raises_its_own_reasons(fake_op):
    fake_op["a"] = ["first reason", "second reason"]
    with pytest.raises(NotImplementedError) as info:
        _dispatch.select("_test_op", "triton", CPU, "in")
    msg = str(info.value)
    assert "    - first reason\n    - second reason" in msg
    assert msg.splitlines()[-1] == "Pick another backend: ['triton', 'torch', 'flex']."
    with pytest.raises(NotImplementedError, match="backend 'natten' is not implemented for _test_op"):
        _dispatch.select("_test_op", "natten", CPU, "")
    with pytest.raises(ValueError, match=re.escape("got backend='gpu'")):
        _dispatch.select("_test_op", "gpu", CPU, "")


def test_use_backend_applies_to_select(fake_op):
    with visattn.use_backend("torch"):
        assert _dispatch.select("_test_op", None, CPU, "").name == "torch"
        assert _dispatch.select("_test_op", "triton", CPU, "").name == "triton"  # explicit wins
    assert _dispatch.select("_test_op", None, CPU, "").name == "triton"


def test_register_backend_rejects_unknown_names():
    with pytest.raises(ValueError):
        _dispatch.register_backend("_test_op", "cudnn", can_run=lambda *a: [])
    assert "_test_op" not in _dispatch._REGISTRY


def test_backend_name_enum_is_accepted():
    assert _dispatch.select("block_sparse", _dispatch.BackendName.TORCH, CPU, "", *_inputs()).name == "torch"
