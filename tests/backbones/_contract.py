"""Shared helpers of the timm contract suite (specs/timm.md §7), used by ``test_timm_contract.py``.

Nothing here is specific to one family. A family plugs into the suite in two places:

* its module name in ``visattn.backbones.FAMILY_MODULES`` (the suite parametrises over
  ``visattn.backbones.list_models()``);
* a test-side module ``tests/backbones/_upstream_<family>.py`` defining
  ``to_upstream_state_dict(state_dict, model) -> dict``, which renames a visattn state dict to the
  original repository's key names (the inverse of the family's ``checkpoint_filter_fn``). The
  offline weight-loading test (§7.2) needs it; a family without one fails that test, it never skips.
  The module may also define ``EXCLUDE_JIT: dict[str, str]`` (model-name pattern -> reason) and
  ``NON_STD: list[str]`` (model-name patterns of isotropic models: NLC ``forward_features``, features
  through the ``getter`` wrapper only; specs/timm.md §6).
"""

from __future__ import annotations

import copy
import fnmatch
import importlib
import os
from collections.abc import Callable

import timm
import torch

# Input-size targets and limits, as in timm's tests/test_models.py.
TARGET_FWD_SIZE = 128  # forward (§7.1: target 128)
TARGET_BWD_SIZE = 128
MAX_BWD_SIZE = 320
MAX_FWD_OUT_SIZE = 448  # default-cfg test runs at the cfg size up to this
TARGET_JIT_SIZE = 128
MAX_JIT_SIZE = 320
TARGET_FFEAT_SIZE = 96
MAX_FFEAT_SIZE = 256

# The largest variants, whose full contract is too slow for 2-core CPU CI (specs/timm.md §7.4): on CPU
# they get construction, parameter count and a forward at a reduced size only, and the full contract
# runs in the cuda job. Every other variant runs the full contract on CPU. ``VISATTN_FULL_CONTRACT=1``
# (or a visible GPU) runs everything on every model.
LARGE_FILTERS = ("*large*", "*_384*")

# Model-name pattern -> reason, for families that cannot be scripted. Families add entries through
# their ``_upstream_<family>.py`` module (``EXCLUDE_JIT``); skipping is allowed only with a reason.
EXCLUDE_JIT: dict[str, str] = {}


# Model-name patterns of isotropic (ViT-like) models, checked with timm's non-std cfg rules. Families add
# theirs through ``NON_STD`` in their ``_upstream_<family>.py``.
NON_STD_FILTERS: list[str] = []


def _family_table(name: str, attr: str):
    try:
        mod = importlib.import_module(f"tests.backbones._upstream_{family_of(name)}")
    except ModuleNotFoundError:
        return None
    return getattr(mod, attr, None)


def is_non_std(name: str) -> bool:
    patterns = list(NON_STD_FILTERS) + list(_family_table(name, "NON_STD") or [])
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def full_contract() -> bool:
    return os.environ.get("VISATTN_FULL_CONTRACT", "") == "1" or torch.cuda.is_available()


def is_large(name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in LARGE_FILTERS)


def all_models() -> list[str]:
    import visattn.backbones as vb

    return sorted(vb.list_models())


def contract_models() -> list[str]:
    """Names that run the full per-model contract here (large variants only with ``full_contract()``)."""
    full = full_contract()
    return [n for n in all_models() if full or not is_large(n)]


def large_models() -> list[str]:
    return [n for n in all_models() if is_large(n)]


# The default model of the model whose contract tests are running, built once and shared (construction
# is mostly weight init: ~1 s for a 90M-parameter model on one core). ``order_by_model`` runs each
# model's tests together, so one entry suffices and memory stays at one model.
_PRISTINE: dict[str, torch.nn.Module] = {}


def pristine_model(name: str) -> torch.nn.Module:
    """``timm.create_model(name)`` in eval mode, built once per model; callers must not modify it.

    Built from seed 0 with the global RNG forked, so a test draws the same inputs whether it built the
    model or found it cached. Tests that change the model take :func:`fresh_model` instead.
    """
    model = _PRISTINE.get(name)
    if model is None:
        _PRISTINE.clear()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False).eval()
        _PRISTINE[name] = model
    return model


def fresh_model(name: str) -> torch.nn.Module:
    """A private copy of :func:`pristine_model` (a deep copy costs a fraction of a construction)."""
    return copy.deepcopy(pristine_model(name))


def order_by_model(items: list) -> None:
    """Run the contract suite model by model (stable within a model), so ``pristine_model`` is built
    once per model. Items of other modules, and unparametrised ones, keep their places."""
    slots = [i for i, it in enumerate(items)
             if it.nodeid.split("::")[0].endswith("test_timm_contract.py")
             and "name" in getattr(getattr(it, "callspec", None), "params", {})]
    first: dict[str, int] = {}
    for i in slots:
        first.setdefault(items[i].callspec.params["name"], i)
    ordered = sorted((items[i] for i in slots), key=lambda it: first[it.callspec.params["name"]])
    for i, it in zip(slots, ordered):
        items[i] = it


def family_of(name: str) -> str:
    """The visattn family module (last dotted component) that registered ``name``."""
    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


def get_input_size(model: torch.nn.Module | None = None, model_name: str = "",
                   target: int | None = None) -> tuple[int, ...]:
    """A copy of timm's ``tests/test_models.py::_get_input_size``.

    The cfg size capped at ``target``; or ``min_input_size`` when the cfg declares one and the cfg size
    exceeds ``target``; or the cfg size when ``fixed_input_size`` is set.
    """
    if model is None:
        input_size = timm.models.get_pretrained_cfg_value(model_name, "input_size")
        fixed_input_size = timm.models.get_pretrained_cfg_value(model_name, "fixed_input_size")
        min_input_size = timm.models.get_pretrained_cfg_value(model_name, "min_input_size")
    else:
        cfg = model.pretrained_cfg
        input_size = cfg["input_size"]
        fixed_input_size = cfg.get("fixed_input_size", None)
        min_input_size = cfg.get("min_input_size", None)
    if input_size is None:
        raise RuntimeError(f"model {model_name or type(model).__name__} has no input_size in its cfg")
    if fixed_input_size:
        return tuple(input_size)
    if min_input_size:
        if target and max(input_size) > target:
            input_size = min_input_size
    elif target and max(input_size) > target:
        input_size = tuple(min(x, target) for x in input_size)
    return tuple(input_size)


def upstream_module(family: str):
    """``tests.backbones._upstream_<family>``; raises (never skips) when the family has none."""
    modname = f"tests.backbones._upstream_{family}"
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name != modname:
            raise
        raise AssertionError(
            f"family {family!r} has no {modname.replace('.', '/')}.py defining "
            "to_upstream_state_dict(state_dict, model) -> dict; the offline weight-loading test "
            "(specs/timm.md §7.2) needs it to write a checkpoint in the original repository's key names"
        ) from None


def upstream_renamer(family: str) -> Callable[[dict, torch.nn.Module], dict]:
    mod = upstream_module(family)
    fn = getattr(mod, "to_upstream_state_dict", None)
    if fn is None:
        raise AssertionError(f"{mod.__name__} does not define to_upstream_state_dict(state_dict, model)")
    return fn


def jit_exclusion(name: str) -> str | None:
    """The reason ``name`` may not be scripted, or None."""
    table = dict(EXCLUDE_JIT)
    table.update(_family_table(name, "EXCLUDE_JIT") or {})
    for pattern, reason in table.items():
        if fnmatch.fnmatch(name, pattern):
            return reason
    return None


def first_mismatch(a: torch.Tensor, b: torch.Tensor) -> str:
    """A short description of where two same-shaped tensors differ most (for failure messages)."""
    diff = (a.double() - b.double()).abs()
    idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    return f"max |diff|={diff.max().item():.3g} at {idx}: {a[idx].item():.6g} vs {b[idx].item():.6g}"
