"""The timm contract (specs/timm.md §7.1-7.3) for every registered visattn backbone.

Parametrised over ``visattn.backbones.list_models()``: a family joins by adding its module to
``FAMILY_MODULES`` and a ``tests/backbones/_upstream_<family>.py`` (see ``_contract.py``). Every test
runs offline (``HF_HUB_OFFLINE=1``) on the ``"torch"`` backend (``conftest.py``), with input sizes from
a copy of timm's ``_get_input_size``. Markers follow timm's ``tests/test_models.py``: ``base``
(forward, backward, kwargs, weight loading, optim), ``cfg`` (default cfg and cfg hygiene),
``torchscript``, ``features`` (features_only wrappers, forward_intermediates). On a CPU machine the
largest variants (``*large*``, ``*_384*``) only get construction, parameter count and a reduced
forward (§7.4); ``VISATTN_FULL_CONTRACT=1`` runs the whole contract on them.

The suite runs model by model (``conftest.py``). Tests that need the default model without testing its
construction arguments share one build per model (``pristine_model``; ``fresh_model`` for a private
copy they may change); every test whose kwargs matter (``num_classes``, ``features_only``, scriptable,
``pretrained``) still calls ``timm.create_model`` itself.
"""

from __future__ import annotations

import fnmatch
import math

import pytest
import timm
import torch
from timm.data import create_transform, resolve_data_config
from timm.optim import create_optimizer_v2

from ._contract import (
    MAX_BWD_SIZE,
    MAX_FFEAT_SIZE,
    MAX_FWD_OUT_SIZE,
    MAX_JIT_SIZE,
    TARGET_BWD_SIZE,
    TARGET_FFEAT_SIZE,
    TARGET_FWD_SIZE,
    TARGET_JIT_SIZE,
    all_models,
    contract_models,
    family_of,
    first_mismatch,
    fresh_model,
    get_input_size,
    is_non_std,
    jit_exclusion,
    large_models,
    pristine_model,
    upstream_renamer,
)

MODELS = contract_models()
STD = [n for n in MODELS if not is_non_std(n)]
NON_STD = [n for n in MODELS if is_non_std(n)]
LARGE = large_models()
ALL = all_models()


def _create(name: str, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, pretrained=False, **kwargs)


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


# --------------------------------------------------------------------------------------------- base


@pytest.mark.base
@pytest.mark.parametrize("name", MODELS)
def test_model_forward(name):
    model = fresh_model(name)
    size = get_input_size(model, target=TARGET_FWD_SIZE)
    x = torch.randn(1, *size)
    with torch.no_grad():
        out = model(x)
        assert out.shape[0] == 1
        assert _finite(out), "forward output has NaN/Inf"
        # unlike timm, grad checkpointing must succeed and change nothing; the same call checks that
        # forward(x) is forward_head(forward_features(x)) (one forward fewer on slow CPU references)
        model.set_grad_checkpointing()
        out_ckpt = model.forward_head(model.forward_features(x))
    torch.testing.assert_close(out_ckpt, out, rtol=1e-4, atol=1e-5)


@pytest.mark.base
@pytest.mark.parametrize("name", MODELS)
def test_model_backward(name):
    size = get_input_size(model_name=name, target=TARGET_BWD_SIZE)
    if max(size) > MAX_BWD_SIZE:
        pytest.fail(f"{name}: fixed input size {size} > {MAX_BWD_SIZE}; declare min_input_size")
    model = _create(name, num_classes=42).train()
    num_params = sum(p.numel() for p in model.parameters())
    out = model(torch.randn(2, *size))
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing[:10]}"
    assert sum(p.grad.numel() for p in model.parameters()) == num_params
    assert out.shape == (2, 42)
    assert _finite(out)
    bad = [n for n, p in model.named_parameters() if not _finite(p.grad)]
    assert not bad, f"NaN/Inf gradients: {bad[:10]}"


@pytest.mark.base
@pytest.mark.parametrize("name", LARGE)
def test_large_model_reduced(name):
    """§7.4: a large variant on CPU gets construction, a parameter count and a forward at a reduced size."""
    model = _create(name).eval()
    assert sum(p.numel() for p in model.parameters()) > 0
    size = get_input_size(model, target=TARGET_FFEAT_SIZE)
    with torch.no_grad():
        out = model(torch.randn(1, *size))
    assert out.shape == (1, model.num_classes)
    assert _finite(out)


@pytest.mark.base
@pytest.mark.parametrize("name", MODELS)
def test_model_kwargs(name):
    """§7.2: the kwargs timm's train.py passes are accepted; an unknown kwarg raises TypeError."""
    model = _create(name, drop_rate=0.1, drop_path_rate=0.1, in_chans=1, num_classes=7).eval()
    size = get_input_size(model, target=TARGET_FFEAT_SIZE)
    with torch.no_grad():
        out = model(torch.randn(1, 1, *size[1:]))
    assert out.shape == (1, 7)
    assert _finite(out)
    with pytest.raises(TypeError):
        _create(name, not_a_kwarg=1)


def _save_upstream(name: str, tmp_path) -> tuple[dict, str]:
    """A random model's state dict, renamed to the original repository's keys, in a safetensors file."""
    from safetensors.torch import save_file

    src = pristine_model(name)
    sd = {k: v.detach().clone() for k, v in src.state_dict().items()}
    upstream = upstream_renamer(family_of(name))(dict(sd), src)
    if not isinstance(upstream, dict) or not upstream:
        raise AssertionError(f"to_upstream_state_dict returned {type(upstream).__name__} for {name}")
    path = tmp_path / f"{name}_upstream.safetensors"
    save_file({k: v.contiguous() for k, v in upstream.items()}, str(path))
    return sd, str(path)


@pytest.mark.base
@pytest.mark.parametrize("name", MODELS)
def test_model_load_pretrained_file(name, tmp_path):
    """§7.2: upstream-named weights load offline through checkpoint_filter_fn, exactly."""
    sd, path = _save_upstream(name, tmp_path)
    overlay = dict(file=path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
    got = model.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), f"{k}: {first_mismatch(got[k], v)}"

    # head reset: every tensor but the classifier loads; the classifier is sized for 5 classes
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=5)
    classifier = model.pretrained_cfg["classifier"]
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    got = model.state_dict()
    assert got[f"{classifier[0]}.weight"].shape[0] == 5
    for k, v in sd.items():
        if not any(k.startswith(c + ".") for c in classifier):
            assert torch.equal(got[k], v), f"{k} (num_classes=5): {first_mismatch(got[k], v)}"

    # in_chans=1: the stem (first_conv) is adapted by summing over the input channels
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, in_chans=1)
    first_conv = model.pretrained_cfg["first_conv"]
    first_conv = (first_conv,) if isinstance(first_conv, str) else tuple(first_conv)
    got = model.state_dict()
    for fc in first_conv:
        w = sd[f"{fc}.weight"]
        torch.testing.assert_close(got[f"{fc}.weight"], w.sum(dim=1, keepdim=True), rtol=1e-6, atol=1e-6)
    for k, v in sd.items():
        if not any(k == f"{fc}.weight" for fc in first_conv):
            assert torch.equal(got[k], v), f"{k} (in_chans=1): {first_mismatch(got[k], v)}"


@pytest.mark.base
@pytest.mark.parametrize("name", MODELS)
def test_model_optim_layer_decay(name):
    """§7.2: create_optimizer_v2 with layer decay works; no_weight_decay() names exist."""
    model = pristine_model(name)  # the optimizer only reads it (no step)
    nwd = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    param_names = [n for n, _ in model.named_parameters()]
    for pattern in nwd:
        assert any(fnmatch.fnmatch(n, pattern) for n in param_names), \
            f"no_weight_decay() names {pattern!r}, which matches no parameter"
    opt = create_optimizer_v2(model, "adamw", weight_decay=0.05, layer_decay=0.75)
    assert len(opt.param_groups) > 2
    assert sum(len(g["params"]) for g in opt.param_groups) == len(param_names)
    scales = {g.get("lr_scale", 1.0) for g in opt.param_groups}
    assert len(scales) > 1, "group_matcher() put every parameter into one layer"


# ---------------------------------------------------------------------------------------------- cfg


@pytest.mark.cfg
@pytest.mark.parametrize("name", STD)
def test_model_default_cfgs(name):
    model = fresh_model(name)
    cfg = model.pretrained_cfg
    sd = model.state_dict()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    assert not hasattr(model, "output_fmt") or model.output_fmt == "NCHW", \
        "hierarchical visattn families are NCHW at stage boundaries (specs/timm.md §6)"
    pool_size = tuple(cfg["pool_size"])
    input_size = tuple(cfg["input_size"])
    if max(input_size) > MAX_FWD_OUT_SIZE:
        pytest.fail(f"{name}: cfg input_size {input_size} > {MAX_FWD_OUT_SIZE}")
    x = torch.randn(1, *input_size)
    # one forward at the cfg size (the slowest call of the suite); the head checks reuse its features,
    # since test_model_forward pins forward(x) == forward_head(forward_features(x))
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.ndim == 4 and tuple(feats.shape[-2:]) == pool_size, (feats.shape, pool_size)
        assert feats.shape[1] == model.num_features
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (1, model.head_hidden_size)

        model.reset_classifier(0)
        assert model.num_classes == 0
        out = model.forward_head(feats)
        assert out.ndim == 2 and out.shape == pre.shape

        model.reset_classifier(0, "")
        out = model.forward_head(feats)
        assert out.ndim == 4 and tuple(out.shape[-2:]) == pool_size
        assert model.num_classes == 0

        unpooled = _create(name, num_classes=0, global_pool="").eval()
        out = unpooled.forward_head(feats)
        assert out.ndim == 4 and tuple(out.shape[-2:]) == pool_size

    for key in ("classifier", "first_conv"):
        names = cfg[key]
        for n in (names,) if isinstance(names, str) else names:
            assert f"{n}.weight" in sd, f"cfg {key}={n!r} is not a parameter prefix"


@pytest.mark.cfg
@pytest.mark.parametrize("name", NON_STD)
def test_model_default_cfgs_non_std(name):
    """Isotropic families: timm's non-std rules, NLC ``forward_features`` allowed (feature dim -1)."""
    model = fresh_model(name)
    cfg = model.pretrained_cfg
    sd = model.state_dict()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    size = get_input_size(model, target=TARGET_FWD_SIZE)
    x = torch.randn(1, *size)
    with torch.no_grad():
        feats = model.forward_features(x)
        if isinstance(feats, tuple):
            feats = feats[0]
        channels = feats.shape[-1] if feats.ndim == 3 else feats.shape[1]
        assert channels == model.num_features, (feats.shape, model.num_features)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0
        out = model.forward_head(feats)
        assert out.shape == pre.shape
    for key in ("classifier", "first_conv"):
        names = cfg[key]
        for n in (names,) if isinstance(names, str) else names:
            assert f"{n}.weight" in sd, f"cfg {key}={n!r} is not a parameter prefix"


@pytest.mark.cfg
@pytest.mark.parametrize("name", ALL)
def test_model_cfg_hygiene(name):
    """§7.2: full hub ids only; license / paper_ids / origin_url everywhere; data config offline."""
    for tag_name in timm.list_pretrained(f"{name}.*") or [name]:
        cfg = timm.models.get_pretrained_cfg(tag_name)
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        hub = cfg.get("hf_hub_id")
        assert not hub or (hub != "timm/" and not hub.startswith("timm/")), f"{tag_name}: hf_hub_id={hub!r}"
        for key in ("license", "paper_ids", "origin_url", "input_size", "pool_size", "mean", "std",
                    "crop_pct", "interpolation", "num_classes", "first_conv", "classifier"):
            assert cfg.get(key) not in (None, ""), f"{tag_name}: cfg has no {key}"
    if name in MODELS:
        model = pristine_model(name)
    else:
        model = timm.create_model(name, pretrained=False, device="meta")
    data_cfg = resolve_data_config({}, model=model)
    transform = create_transform(**data_cfg)
    assert transform is not None


# -------------------------------------------------------------------------------------- torchscript


@pytest.mark.torchscript
@pytest.mark.parametrize("name", MODELS)
def test_model_forward_torchscript(name):
    reason = jit_exclusion(name)
    if reason:
        pytest.skip(f"EXCLUDE_JIT: {reason}")
    size = get_input_size(model_name=name, target=TARGET_JIT_SIZE)
    if max(size) > MAX_JIT_SIZE:
        pytest.fail(f"{name}: input size {size} > {MAX_JIT_SIZE}")
    with timm.layers.set_scriptable(True):
        model = _create(name).eval()
    scripted = torch.jit.script(model)
    with torch.no_grad():
        out = scripted(torch.randn(1, *size))
    assert out.shape[0] == 1 and _finite(out)


# ----------------------------------------------------------------------------------------- features


def _as_list(out) -> list[torch.Tensor]:
    return list(out.values()) if isinstance(out, dict) else list(out)


@pytest.mark.features
@pytest.mark.parametrize("feature_cls", ["list", "dict", "hook", "getter"])
@pytest.mark.parametrize("name", MODELS)
def test_model_forward_features(name, feature_cls):
    if feature_cls != "getter" and is_non_std(name):
        pytest.skip("isotropic families expose features through the getter wrapper (specs/timm.md §4)")
    model = _create(name, features_only=True, feature_cls=feature_cls).eval()
    channels = model.feature_info.channels()
    reductions = model.feature_info.reduction()
    assert len(channels) >= 3
    size = get_input_size(model, target=TARGET_FFEAT_SIZE)
    if max(size) > MAX_FFEAT_SIZE:
        pytest.fail(f"{name}: input size {size} > {MAX_FFEAT_SIZE}")
    with torch.no_grad():
        out = model(torch.randn(1, *size))
    outs = _as_list(out)
    assert len(outs) == len(channels) == len(model.feature_info.out_indices)
    for c, r, o in zip(channels, reductions, outs):
        assert o.shape[0] == 1 and o.shape[1] == c, (o.shape, c)
        for s, d in zip(size[1:], o.shape[-2:]):
            assert d <= math.ceil(s / r) + 1, (o.shape, size, r)
        assert _finite(o)
    if feature_cls == "dict":
        assert list(out.keys()) == [str(i) for i in model.feature_info.out_indices]

    sub = _create(name, features_only=True, feature_cls=feature_cls, out_indices=(1, 3)).eval()
    with torch.no_grad():
        out = sub(torch.randn(1, *size))
    assert len(_as_list(out)) == 2
    if feature_cls == "dict":
        assert list(out.keys()) == ["1", "3"]


@pytest.mark.features
@pytest.mark.parametrize("name", MODELS)
def test_model_forward_intermediates(name):
    model = fresh_model(name)
    info = model.feature_info
    size = get_input_size(model, target=TARGET_FFEAT_SIZE)
    x = torch.randn(1, *size)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x, output_fmt="NCHW")
        assert len(feats) >= 3 and len(feats) == len(info)
        for f, i in zip(feats, info):
            assert f.ndim == 4 and f.shape[1] == i["num_chs"], (f.shape, i)
            for s, d in zip(size[1:], f.shape[-2:]):
                assert d <= math.ceil(s / i["reduction"]) + 1
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0,
                                   msg="forward_intermediates' final must equal forward_features")
        only = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True, stop_early=True)
        assert isinstance(only, list) and len(only) == 2
        assert [f.shape for f in only] == [feats[0].shape, feats[2].shape]
        model.set_grad_checkpointing()
        final_ckpt, last2 = model.forward_intermediates(x, indices=2)
    assert len(last2) == 2
    torch.testing.assert_close(final_ckpt, final, rtol=1e-4, atol=1e-5)
    if is_non_std(name):  # isotropic families also return tokens
        with torch.no_grad():
            nlc = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        assert len(nlc) == len(info) and all(f.ndim == 3 for f in nlc)


def test_feature_take_indices_import_path():
    """timm 1.0.31 does not re-export feature_take_indices from timm.models; families import it from here."""
    from timm.models._features import feature_take_indices

    assert feature_take_indices(4, None) == ([0, 1, 2, 3], 3)
    assert feature_take_indices(4, 2) == ([2, 3], 3)


# ------------------------------------------------------------------------ package level (subprocess)

_IMPORT_PROBE = r"""
import json, sys, time, warnings
import torch
import timm
before = set(timm.list_models())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    t0 = time.perf_counter()
    import visattn
    t1 = time.perf_counter()
import visattn.backbones as vb
after = set(timm.list_models())
mods = {n: timm.models.model_entrypoint(n).__module__ for n in after - before}
print(json.dumps(dict(
    new=sorted(after - before),
    listed=sorted(vb.list_models()),
    families=list(vb.FAMILY_MODULES),
    modules=mods,
    warnings=[str(w.message) for w in caught],
    diffusers="diffusers" in sys.modules,
    pipelines=sorted(m for m in sys.modules if m.startswith("visattn.pipelines")),
    kernels=sorted(m for m in sys.modules if m.startswith("visattn.kernels")),
    cuda_initialized=torch.cuda.is_initialized(),
    seconds=t1 - t0,
)))
"""


def _probe(code: str) -> tuple[dict, str]:
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="always")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"probe failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_import_registers_declared_names():
    """§7.3: ``import visattn`` registers exactly the families' names, cheaply and without side effects."""
    import statistics

    runs = [_probe(_IMPORT_PROBE) for _ in range(3)]
    info, stderr = runs[0]
    assert info["new"] == info["listed"], (
        f"import visattn registered {sorted(set(info['new']) ^ set(info['listed']))} outside list_models()")
    declared = {n for n, m in info["modules"].items() if m.rsplit(".", 1)[-1] in info["families"]}
    assert set(info["new"]) == declared
    for n, m in info["modules"].items():
        assert m.startswith("visattn.backbones."), f"{n} is registered by {m}"
    overwriting = [w for w in info["warnings"] if "Overwriting" in w] + \
        [line for line in stderr.splitlines() if "Overwriting" in line]
    assert not overwriting, overwriting
    assert info["diffusers"] is False, "import visattn imported diffusers"
    assert not info["pipelines"], f"import visattn imported {info['pipelines']}"
    assert not info["kernels"], f"import visattn imported Triton kernel modules {info['kernels']}"
    assert info["cuda_initialized"] is False, "import visattn initialised CUDA"
    # §2 budget: import visattn may cost at most import timm + 0.3 s; timm is already imported here,
    # so the measured time is exactly visattn's extra cost.
    extra = statistics.median(r[0]["seconds"] for r in runs)
    assert extra <= 0.3, f"import visattn costs {extra:.3f} s on top of import timm (budget 0.3 s)"


def test_family_module_names_free_in_timm():
    """§7.3: no family module name is one of timm's own module names (list_models(module=...) would merge)."""
    import visattn.backbones as vb

    code = ("import json, timm; print(json.dumps(sorted(timm.list_modules())))")
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    timm_modules = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    clash = sorted(set(vb.FAMILY_MODULES) & timm_modules)
    assert not clash, f"family module names {clash} are taken by timm"


def test_every_entrypoint_module_is_visattn():
    for name in ALL:
        module = timm.models.model_entrypoint(name).__module__
        assert module.startswith("visattn.backbones."), f"{name} -> {module}"
