"""Argument normalisation and tensor checks shared by every visattn op.

Every check raises ``ValueError`` (bad argument or shape) with a message of the form
"expected X, got name=value", naming the argument and, where it matters, the axis. None of them
reads tensor *values*, so no check synchronises with the device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from ._types import Layout

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LAYOUTS: tuple[Layout, ...] = ("BNHD", "BHND")


def normalize_tuple(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    """Turn an int or a per-axis sequence into an ``n``-tuple of ints.

    Raises:
        ValueError: if ``value`` is a sequence of the wrong length or holds non-integers.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected an int or a sequence of {n} ints, got {name}={value!r}")
    if isinstance(value, int):
        return (value,) * n
    try:
        out = tuple(value)
    except TypeError:
        raise ValueError(f"expected an int or a sequence of {n} ints, got {name}={value!r}") from None
    if len(out) != n or not all(isinstance(x, int) and not isinstance(x, bool) for x in out):
        raise ValueError(f"expected an int or a sequence of {n} ints, got {name}={value!r}")
    return out


def check_power_of_two(name: str, value: int, *, minimum: int = 1) -> int:
    """Check that ``value`` is an int power of two no smaller than ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or value & (value - 1):
        raise ValueError(f"expected {name} to be a power of two >= {minimum}, got {name}={value!r}")
    return value


def check_layout(layout: str) -> Layout:
    if layout not in LAYOUTS:
        raise ValueError(f"expected layout to be one of {LAYOUTS}, got layout={layout!r}")
    return layout  # type: ignore[return-value]


def check_scale(scale: float | None, head_dim: int) -> float:
    """Return the softmax scale, ``head_dim ** -0.5`` when ``scale`` is None."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"expected scale to be a Python float or None, got scale={scale!r}")
    if not scale > 0 or scale == float("inf"):
        raise ValueError(f"expected scale to be a finite positive float, got scale={scale!r}")
    return float(scale)


def _axis_names(layout: Layout) -> tuple[str, str, str, str]:
    return ("B", "N", "H", "D") if layout == "BNHD" else ("B", "H", "N", "D")


def check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout
) -> tuple[int, int, int, int, int, int]:
    """Check a q/k/v triple in a 4-D token layout.

    ``layout="BNHD"`` means ``[batch, tokens, heads, head_dim]`` (diffusers' dispatcher order);
    ``"BHND"`` means ``[batch, heads, tokens, head_dim]``. Keys and values share their token count;
    query heads must be a multiple of key/value heads (GQA / MQA).

    Returns:
        ``(B, N_q, N_k, H, H_kv, D)``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"expected {name} to be a torch.Tensor, got {name}={type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"expected {name} of rank 4 in layout {layout} [{', '.join(_axis_names(layout))}], "
                f"got {name}.shape={tuple(t.shape)}"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"expected {name}.dtype in (float16, bfloat16, float32, float64), got {name}.dtype={t.dtype}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"expected q, k and v to share one dtype, got q.dtype={q.dtype}, k.dtype={k.dtype}, "
            f"v.dtype={v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"expected q, k and v on one device, got q.device={q.device}, k.device={k.device}, "
            f"v.device={v.device}"
        )
    n_ax, h_ax = (1, 2) if layout == "BNHD" else (2, 1)
    B, Nq, H, D = q.shape[0], q.shape[n_ax], q.shape[h_ax], q.shape[3]
    Nk, Hk = k.shape[n_ax], k.shape[h_ax]
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(
            f"expected q, k and v to share the batch size (axis 0), got q.shape[0]={B}, "
            f"k.shape[0]={k.shape[0]}, v.shape[0]={v.shape[0]}"
        )
    if v.shape[n_ax] != Nk:
        raise ValueError(
            f"expected k and v to share the token count (axis {n_ax}), got k.shape[{n_ax}]={Nk}, "
            f"v.shape[{n_ax}]={v.shape[n_ax]}"
        )
    if v.shape[h_ax] != Hk:
        raise ValueError(
            f"expected k and v to share the head count (axis {h_ax}), got k.shape[{h_ax}]={Hk}, "
            f"v.shape[{h_ax}]={v.shape[h_ax]}"
        )
    if Hk == 0 or H % Hk:
        raise ValueError(
            f"expected the query heads to be a multiple of the key/value heads (axis {h_ax}), "
            f"got q.shape[{h_ax}]={H}, k.shape[{h_ax}]={Hk}"
        )
    if k.shape[3] != D or v.shape[3] != D:
        raise ValueError(
            f"expected q, k and v to share the head dim (axis 3), got q.shape[3]={D}, "
            f"k.shape[3]={k.shape[3]}, v.shape[3]={v.shape[3]}"
        )
    if min(B, Nq, Nk, H, D) == 0:
        raise ValueError(
            f"expected non-empty q/k/v, got q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}"
        )
    return B, Nq, Nk, H, Hk, D


def describe_tensors(**tensors: torch.Tensor) -> str:
    """One-line input summary for dispatch errors: shapes, dtype, device."""
    parts = [
        f"{name}: shape={tuple(t.shape)} dtype={t.dtype} device={t.device}"
        for name, t in tensors.items()
        if isinstance(t, torch.Tensor)
    ]
    return "; ".join(parts)


# Tests only: the sparse video methods (PSA, Rectified SpaAttn) accept their test-only block sizes (tiny
# interpreter shapes) for configs built inside ``allow_test_block_sizes()``; one switch for both.
_TEST_BLOCK_SIZES = [0]


@contextlib.contextmanager
def allow_test_block_sizes():
    """Tests only: method configs built inside accept their test-only block sizes (tiny interpreter shapes)."""
    _TEST_BLOCK_SIZES[0] += 1
    try:
        yield
    finally:
        _TEST_BLOCK_SIZES[0] -= 1


def block_sizes_for_tests_allowed() -> bool:
    """True inside :func:`allow_test_block_sizes`."""
    return _TEST_BLOCK_SIZES[0] > 0
