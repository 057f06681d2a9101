"""Triton launches with less host time.

``kernel[grid](...)`` binds and specializes every argument on every call (Triton's binder, cache key,
launch metadata): on the H100 host about 57 us for the 64-argument neighborhood forward, more than the
kernel itself at backbone shapes, so small layers were host bound (benchmarks/NOTES.md). :func:`launch`
keys the compiled kernel by what Triton specializes on, cheaper to compute for these launchers: the
integer arguments' values, each tensor's dtype and 16-byte alignment, the constexpr and launch options
and the current device. On a hit it calls the compiled kernel's C launcher directly; a miss, a launch
hook (profilers) or the interpreter goes through ``kernel[grid]``, which compiles or finds the kernel.

Set ``VISATTN_CHECK_LAUNCH=1`` to have every hit recompute Triton's own key and check that it names the
same compiled kernel and the same argument list (the GPU test suite runs with it).

Used by the launchers of the ops that run inside vision backbones, where calls are small and many
(neighborhood, bi-level routing, agent). The block-sparse, PSA, Rectified and RoPE launchers keep
``kernel[grid]``: they run at video-diffusion shapes, where one call is milliseconds of GPU work.
"""

from __future__ import annotations

import inspect
import os
from operator import attrgetter

import torch

from ._common import INTERPRET

try:  # Triton >= 3.4 (hooks as a HookChain, or None in some versions)
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older Triton: every launch takes Triton's path
    _knobs = None

CHECK = os.environ.get("VISATTN_CHECK_LAUNCH", "0") == "1"
_MAX_ENTRIES = 4096  # distinct (kernel, shape, options) keys before the cache starts over
_ENTRIES: dict = {}
_dtype = attrgetter("dtype")
_ptr = torch.Tensor.data_ptr
_fast = _knobs is not None and not INTERPRET  # cleared if a compiled kernel lacks the launcher fields


def launch(kernel, grid: tuple, tensors: tuple, ints: tuple, floats: tuple = (), **meta) -> None:
    """``kernel[grid](*tensors, *ints, *floats, **meta)``: the kernel's positional parameters must come
    in that order (tensors, then integers and bools, then floats); ``meta`` holds its constexprs and
    launch options (``num_warps``, ``num_stages``). ``tensors`` holds no None (pass a dummy tensor)."""
    if not _fast or _hooked():
        if INTERPRET:  # CPU tests: every launch site keeps the contract the cached path relies on
            _check_contract(kernel, tensors, ints, floats, meta)
        kernel[grid](*tensors, *ints, *floats, **meta)
        return
    device = torch._C._cuda_getDevice()  # torch.cuda.current_device() without its Python wrapper
    key = (id(kernel), device, ints, tuple(map(_dtype, tensors)), tuple([_ptr(t) & 15 for t in tensors]),
           tuple(meta.items()))
    entry = _ENTRIES.get(key)
    if entry is None:
        _record(key, kernel, grid, tensors, ints, floats, meta, device)
        return
    function, run, packed, tail, _ = entry
    if CHECK:
        _check(entry, kernel, device, (*tensors, *ints, *floats), meta)
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    run(grid[0], g1, g2, torch._C._cuda_getCurrentRawStream(device), function, packed, None, None, None,
        *tensors, *ints, *floats, *tail)


def _hooked() -> bool:
    hook = _knobs.runtime.launch_enter_hook
    return bool(getattr(hook, "calls", hook))  # a HookChain with hooks, or a plain callable


def _record(key, kernel, grid, tensors, ints, floats, meta, device) -> None:
    global _fast
    compiled = kernel[grid](*tensors, *ints, *floats, **meta)
    if hasattr(compiled, "result"):  # asynchronous compile mode
        compiled = compiled.result()
    if not all(hasattr(compiled, a) for a in ("function", "run", "packed_metadata")):
        _fast = False  # a Triton whose compiled kernels differ: keep its own launch path
        return
    n = len(tensors) + len(ints) + len(floats)
    tail = []
    params = list(kernel.signature.parameters.items())[n:]
    for p, (name, sig) in zip(kernel.params[n:], params, strict=True):
        if not p.is_constexpr:
            raise RuntimeError(f"launch({kernel}): parameter {name} is not a constexpr; pass it positionally")
        if name in meta:
            tail.append(meta[name])
        elif sig.default is not inspect.Parameter.empty:
            tail.append(sig.default)
        else:
            raise RuntimeError(f"launch({kernel}): constexpr {name} has no value")
    if len(_ENTRIES) >= _MAX_ENTRIES:
        _ENTRIES.clear()
    _ENTRIES[key] = (compiled.function, compiled.run, compiled.packed_metadata, tuple(tail), compiled)


def _check(entry, kernel, device, args, meta) -> None:
    """Triton's own binding of these arguments must find the recorded kernel and argument list."""
    from triton.runtime.jit import compute_cache_key

    # the options JITFunction.run adds before binding (Triton 3.6)
    meta = dict(meta, debug=meta.get("debug", kernel.debug) or _knobs.runtime.debug,
                instrumentation_mode=_knobs.compilation.instrumentation_mode)
    kernel_cache, key_cache, _, _, binder = kernel.device_caches[device]
    bound, spec, options = binder(*args, **meta)
    compiled = kernel_cache.get(compute_cache_key(key_cache, spec, options))
    values, ours = tuple(bound.values()), (*args, *entry[3])
    bad = [i for i, (a, b) in enumerate(zip(values, ours, strict=False))
           if a is not b and (isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or a != b)]
    if compiled is not entry[4] or len(values) != len(ours) or bad:
        raise RuntimeError(f"launch({kernel}): the cached launch differs from Triton's binding (same "
                           f"kernel: {compiled is entry[4]}, {len(values)} vs {len(ours)} arguments, "
                           f"differing at {bad})")


_CONSTEXPR_TAILS: dict = {}


def _check_contract(kernel, tensors, ints, floats, meta) -> None:
    """Tensors, then ints/bools (keyed by value), then floats (not keyed), then only constexprs by keyword:
    a float among the ints, an int among the floats or a runtime parameter passed by keyword would make a
    cached launch reuse a kernel specialized for other values."""
    bad = ([f"tensors[{i}]" for i, t in enumerate(tensors) if not isinstance(t, torch.Tensor)]
           + [f"ints[{i}]" for i, x in enumerate(ints) if isinstance(x, (float, torch.Tensor))]
           + [f"floats[{i}]" for i, x in enumerate(floats) if type(x) is not float])
    n = len(tensors) + len(ints) + len(floats)
    key = (id(kernel), n)
    if key not in _CONSTEXPR_TAILS:
        params = list(inspect.signature(getattr(kernel, "fn", kernel)).parameters.values())
        runtime = [p.name for p in params[n:] if "constexpr" not in str(p.annotation)]
        _CONSTEXPR_TAILS[key] = (len(params), runtime)
    n_params, runtime = _CONSTEXPR_TAILS[key]
    bad += [f"runtime parameter {name} not passed positionally" for name in runtime]
    if n > n_params:
        bad.append(f"{n} positional arguments for {n_params} parameters")
    if bad:
        raise TypeError(f"launch({getattr(kernel, '__name__', kernel)}): {', '.join(bad)}")
