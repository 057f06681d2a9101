"""Tests of the argument normalisers and their error messages (``visattn.ops._checks``)."""

from __future__ import annotations

import re

import pytest
import torch

from visattn.ops._checks import check_layout, check_power_of_two, check_scale, normalize_tuple


@pytest.mark.parametrize(
    "value, n, want",
    [(3, 2, (3, 3)), (7, 1, (7,)), ((1, 2), 2, (1, 2)), ([4, 5, 6], 3, (4, 5, 6)), (range(2), 2, (0, 1))],
)
def test_normalize_tuple(value, n, want):
    got = normalize_tuple(value, n, "window")
    assert got == want and isinstance(got, tuple)


@pytest.mark.parametrize(
    "value, shown",
    [((1, 2, 3), "(1, 2, 3)"), ((1,), "(1,)"), (True, "True"), ((1, True), "(1, True)"), ((1, 2.0), "(1, 2.0)"),
     (None, "None"), ("ab", "'ab'"), (1.5, "1.5")],
)
def test_normalize_tuple_errors(value, shown):
    with pytest.raises(ValueError, match=re.escape(f"expected an int or a sequence of 2 ints, got window={shown}")):
        normalize_tuple(value, 2, "window")


@pytest.mark.parametrize("value, minimum", [(1, 1), (16, 16), (64, 16), (1024, 1), (2**20, 16)])
def test_check_power_of_two(value, minimum):
    assert check_power_of_two("block", value, minimum=minimum) == value


@pytest.mark.parametrize(
    "value, minimum, shown",
    [(24, 16, "24"), (8, 16, "8"), (0, 1, "0"), (-16, 1, "-16"), (True, 1, "True"), (16.0, 16, "16.0"),
     ("16", 16, "'16'"), (48, 1, "48")],
)
def test_check_power_of_two_errors(value, minimum, shown):
    with pytest.raises(ValueError, match=re.escape(f"expected block to be a power of two >= {minimum}, got block={shown}")):
        check_power_of_two("block", value, minimum=minimum)


def test_check_scale_defaults_and_values():
    assert check_scale(None, 64) == pytest.approx(0.125)
    assert check_scale(None, 96) == pytest.approx(1 / 96**0.5)
    assert check_scale(0.5, 64) == 0.5
    got = check_scale(2, 64)
    assert got == 2.0 and isinstance(got, float)
    assert check_scale(1e-30, 64) == 1e-30


@pytest.mark.parametrize(
    "value, message",
    [
        (0, "expected scale to be a finite positive float, got scale=0"),
        (-0.5, "expected scale to be a finite positive float, got scale=-0.5"),
        (float("nan"), "expected scale to be a finite positive float, got scale=nan"),
        (float("inf"), "expected scale to be a finite positive float, got scale=inf"),
        (True, "expected scale to be a Python float or None, got scale=True"),
        ("0.1", "expected scale to be a Python float or None, got scale='0.1'"),
        (torch.tensor(0.1), "expected scale to be a Python float or None, got scale=tensor(0.1000)"),
    ],
)
def test_check_scale_errors(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_scale(value, 64)


@pytest.mark.parametrize("layout", ["BNHD", "BHND"])
def test_check_layout(layout):
    assert check_layout(layout) == layout


@pytest.mark.parametrize("layout", ["bnhd", "BSHD", "", None, "BNHD "])
def test_check_layout_errors(layout):
    with pytest.raises(ValueError, match=re.escape(f"expected layout to be one of ('BNHD', 'BHND'), got layout={layout!r}")):
        check_layout(layout)
