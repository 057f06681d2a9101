"""The launch cache (kernels/_launch.py) on a stand-in kernel: which calls reuse a recorded launch.

The CPU runs kernels in Triton's interpreter, where ``launch`` always takes ``kernel[grid]``; here its
cached path is switched on against a fake compiled kernel, so the keying is tested without a GPU. The
GPU suite runs every real launch with ``VISATTN_CHECK_LAUNCH=1`` (tests/conftest.py), which checks each
cache hit against Triton's own binding.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
import triton.language as tl

from visattn.kernels import _launch


def _body(X, Y, n, m, scale, BLOCK: tl.constexpr, FLAG: tl.constexpr = False):  # the stand-in's signature
    pass


class _Kernel:
    """Records ``kernel[grid](...)`` calls (misses) and C-launcher calls (hits)."""

    def __init__(self):
        self.fn = _body
        self.signature = inspect.signature(_body)
        self.params = [SimpleNamespace(is_constexpr=name in ("BLOCK", "FLAG"))
                       for name in self.signature.parameters]
        self.misses, self.hits = [], []
        self.compiled = SimpleNamespace(function="fn", packed_metadata="meta", run=self._run)

    def __getitem__(self, grid):
        def runner(*args, **meta):
            self.misses.append((grid, args, meta))
            return self.compiled
        return runner

    def _run(self, g0, g1, g2, stream, function, packed, launch_meta, enter, exit_, *args):
        self.hits.append(((g0, g1, g2), function, packed, args))


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(_launch, "_fast", True)
    monkeypatch.setattr(_launch, "_hooked", lambda: False)
    monkeypatch.setattr(_launch, "_ENTRIES", {})
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 7, raising=False)


def test_repeat_call_hits_with_full_argument_list(fast):
    kern = _Kernel()
    x, y = torch.zeros(8), torch.zeros(8)
    _launch.launch(kern, (3, 2), (x, y), (5, 16), (0.5,), BLOCK=32, num_warps=4)
    assert len(kern.misses) == 1 and kern.misses[0][1] == (x, y, 5, 16, 0.5)
    x2, y2 = torch.zeros(8), torch.zeros(8)
    _launch.launch(kern, (4,), (x2, y2), (5, 16), (0.25,), BLOCK=32, num_warps=4)
    assert len(kern.misses) == 1 and len(kern.hits) == 1
    grid, function, packed, args = kern.hits[0]
    assert grid == (4, 1, 1) and (function, packed) == ("fn", "meta")
    # new tensors and float in place; the constexprs follow in signature order, defaults included
    assert args[0] is x2 and args[1] is y2 and args[2:] == (5, 16, 0.25, 32, False)


@pytest.mark.parametrize("change", ["int", "dtype", "alignment", "constexpr", "option"])
def test_what_triton_specializes_on_misses(fast, change):
    kern = _Kernel()
    base = torch.zeros(16)
    _launch.launch(kern, (1,), (base, base), (5, 16), (0.5,), BLOCK=32, num_warps=4)
    x, ints, meta = base, (5, 16), dict(BLOCK=32, num_warps=4)
    if change == "int":
        ints = (5, 17)
    elif change == "dtype":
        x = torch.zeros(16, dtype=torch.float16)
    elif change == "alignment":
        x = base[1:]  # 4 bytes past a 16-byte boundary
    elif change == "constexpr":
        meta["BLOCK"] = 64
    else:
        meta["num_warps"] = 8
    _launch.launch(kern, (1,), (x, base), ints, (0.5,), **meta)
    assert len(kern.misses) == 2 and not kern.hits


def test_float_value_is_not_a_key(fast):
    kern = _Kernel()
    x = torch.zeros(4)
    for scale in (0.5, 0.125, 3.0):
        _launch.launch(kern, (1,), (x, x), (1, 2), (scale,), BLOCK=16)
    assert len(kern.misses) == 1 and [h[3][4] for h in kern.hits] == [0.125, 3.0]


def test_non_constexpr_keyword_is_refused(fast):
    kern = _Kernel()
    x = torch.zeros(4)
    with pytest.raises(RuntimeError, match="scale is not a constexpr"):
        _launch.launch(kern, (1,), (x, x), (1, 2), (), scale=0.5, BLOCK=16)


@pytest.mark.parametrize("why", ["interpreter", "launch hook"])
def test_interpreter_and_hooks_take_tritons_path(fast, monkeypatch, why):
    kern = _Kernel()
    x = torch.zeros(4)
    if why == "interpreter":
        monkeypatch.setattr(_launch, "_fast", False)
    else:
        monkeypatch.setattr(_launch, "_hooked", lambda: True)
    for _ in range(2):
        _launch.launch(kern, (1,), (x, x), (1, 2), (0.5,), BLOCK=16)
    assert len(kern.misses) == 2 and not kern.hits


def test_check_mode_sees_every_hit(fast, monkeypatch):
    kern = _Kernel()
    seen = []
    monkeypatch.setattr(_launch, "CHECK", True)
    monkeypatch.setattr(_launch, "_check",
                        lambda entry, kernel, device, args, meta: seen.append((entry[4], args)))
    x = torch.zeros(4)
    for _ in range(3):
        _launch.launch(kern, (1,), (x, x), (1, 2), (0.5,), BLOCK=16)
    assert len(kern.hits) == 2 and [s[0] for s in seen] == [kern.compiled] * 2
    assert seen[0][1] == (x, x, 1, 2, 0.5)


@pytest.mark.parametrize("case",
                         ["none tensor", "float among ints", "int among floats", "runtime by keyword"])
def test_interpreter_checks_the_launch_contract(monkeypatch, case):
    """Under the interpreter (CPU tests) every launch site is held to what the cached path needs."""
    kern = _Kernel()
    x = torch.zeros(4)
    monkeypatch.setattr(_launch, "_fast", False)
    monkeypatch.setattr(_launch, "INTERPRET", True)
    args = {"none tensor": ((x, None), (1, 2), (0.5,), {}),
            "float among ints": ((x, x), (1, 2.0), (0.5,), {}),
            "int among floats": ((x, x), (1, 2), (1,), {}),
            "runtime by keyword": ((x, x), (1, 2), (), dict(scale=0.5))}
    tensors, ints, floats, extra = args[case]
    with pytest.raises(TypeError, match="launch"):
        _launch.launch(kern, (1,), tensors, ints, floats, BLOCK=16, **extra)
    assert not kern.misses
