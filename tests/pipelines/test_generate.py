"""``visattn generate`` end to end on the tiny offline pipelines (specs/diffusers.md §10)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")  # the diffusers extra; installed in CI through the test extra

import visattn.pipelines as vp
from visattn.cli import _generate_io
from visattn.cli.main import main
from visattn.pipelines.apply import enumerate_processors


def _gen(tmp_path, monkeypatch, tiny, method, *extra):
    from visattn.pipelines._tiny_pipes import tiny_pipeline

    pipe = tiny_pipeline(tiny)
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    before = enumerate_processors(denoiser)
    monkeypatch.setattr(_generate_io, "load_pipeline", lambda args, dtype, device: pipe)
    out = tmp_path / f"{tiny}_{method}"
    rc = main(
        [
            "generate",
            "--tiny",
            tiny,
            "--method",
            method,
            "--steps",
            "2",
            "--height",
            "32",
            "--width",
            "32",
            "--frames",
            "5",
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ]
    )
    assert rc == 0
    after = enumerate_processors(denoiser)
    assert all(after[k][1] is before[k][1] for k in before), "processors not restored"
    assert not hasattr(denoiser, "_visattn_handle")
    return out, json.loads((out / "report.json").read_text())


@pytest.mark.parametrize(
    "tiny,method,extra",
    [
        ("dit", "dense", ("--warmup", "1")),
        ("unet", "dense", ()),
        ("flux", "neighborhood", ("--set", "backend=torch", "--set", "kernel_size=[3, 3]")),
        (
            "wan",
            "neighborhood",
            (
                "--set",
                "backend=torch",
                "--preset",
                "wan21_480p",
                "--set",
                "kernel_size=[2,3,3]",
                "--set",
                "stride=1",
                "--height",
                "64",
                "--width",
                "64",
                "--compare-dense",
                "--compare-default",
            ),
        ),
    ],
)
def test_generate_tiny(tmp_path, monkeypatch, capsys, tiny, method, extra):
    monkeypatch.setattr(_generate_io, "mp4_unavailable_reason", lambda: "no MP4 writer in this test")
    out, rep = _gen(tmp_path, monkeypatch, tiny, method, *extra)
    assert rep["method"] == method and rep["steps"] == 2
    assert rep["attention_time_s"] > 0 and 0 < rep["attention_share"] <= 1
    assert rep["total_calls"] > 0 and rep["fallbacks"] == {}
    for f in rep["files"]:
        assert (out / f).is_file()
    assert rep["files"][0].startswith(f"{method}_seed0")
    assert rep["versions"]["diffusers"] and rep["config"]
    assert len(rep["warmup_s"]) == (1 if tiny == "dit" else 0)
    err = capsys.readouterr().err
    if tiny == "wan":  # a video with --format auto and no MP4 writer: a GIF, and the reason printed
        assert rep["files"] == ["neighborhood_seed0.gif"]
        assert rep["output_note"] == "wrote a GIF instead of MP4: no MP4 writer in this test"
        assert f"visattn generate: {rep['output_note']}" in err
        with Image.open(out / rep["files"][0]) as im:
            assert im.size == (64, 64) and im.n_frames > 1
    else:
        assert rep["output_note"] is None and "visattn generate:" not in err
    if tiny == "wan":
        assert rep["layouts"] and rep["density"] < 1
        assert (
            rep["config"]["kernel_size"] == [2, 3, 3] and rep["config"]["dense_steps"] == 0.2
        )  # preset + --set
        cmp = rep["compare_dense"]
        assert cmp["speedup"] > 0 and cmp["psnr_db"] > 10 and 0 < cmp["rel_l2"] < 1  # differs from dense
        assert rep["dense"]["method"] == "dense" and cmp["attention_speedup"] > 0
        dflt = rep["compare_default"]
        assert dflt["speedup"] > 0 and dflt["denoise_speedup"] > 0 and 0 < dflt["rel_l2"] < 1
        assert rep["default"]["files"] == ["default_seed0.gif"] and "attention_speedup" not in dflt


_WAN_SIZE = ("--height", "64", "--width", "64")  # 2 x 4 x 4 latent tokens: two 16-token blocks


@pytest.mark.parametrize(
    "tiny,method,extra,expected_calls",
    [
        # 3 attn1 at ds = 1 in the tiny UNet (down_blocks.0: 1, up_blocks.1: 2). agentsd_sd15's phase
        # starts at 0.4 of the steps: step 0 merges with agents, step 1 (ceil(0.8)) merges only
        (
            "unet",
            "agent",
            ("--preset", "agentsd_sd15", "--set", "backend=torch"),
            {"agent": 3, "agent: tome only": 3},
        ),
        # tiny Wan: 2 blocks x 2 steps x separate cond / uncond calls
        (
            "wan",
            "pyramid",
            (
                *("--set", "backend=torch", "--set", "block_q=16", "--set", "block_k=16"),
                *("--set", "levels={1: 0.25, 2: 0.4, 4: 0.5, 8: 0.75}", "--set", "align=none", *_WAN_SIZE),
            ),
            {"PyramidWanAttnProcessor": 8},
        ),
        (
            "wan",
            "rectified",
            (
                *("--set", "backend=torch", "--set", "block_size=16", "--set", "drop_rate=0.9"),
                *("--set", "cum_threshold=0.1", "--set", "neighbours=false", *_WAN_SIZE),
            ),
            {"RectifiedWanAttnProcessor": 8},
        ),
    ],
)
def test_generate_tiny_sparse_methods(tmp_path, monkeypatch, capsys, tiny, method, extra, expected_calls):
    from visattn.ops.rectified_plan import allow_test_block_sizes

    monkeypatch.setattr(_generate_io, "mp4_unavailable_reason", lambda: "no MP4 writer in this test")
    # 16-token blocks for both sparse methods (the tiny Wan has 32 video tokens)
    with allow_test_block_sizes():
        out, rep = _gen(tmp_path, monkeypatch, tiny, method, *extra)
    printed = capsys.readouterr().out
    assert rep["method"] == method and rep["files"]
    for f in rep["files"]:
        assert (out / f).is_file()
    assert rep["files"][0] == f"{method}_seed0." + ("gif" if tiny == "wan" else "png")
    # every call ran the method itself: no fallback, none made dense by a schedule
    assert rep["calls"] == expected_calls and rep["fallbacks"] == {} and rep["dense_by_schedule"] == 0
    assert rep["attention_time_s"] > 0
    if method == "rectified":
        assert rep["config"]["block_size"] == 16 and rep["config"]["neighbours"] is False
    calls = ", ".join(f"{k}: {v}" for k, v in expected_calls.items())
    total = sum(expected_calls.values())
    assert re.search(rf"^  calls +{total} \({re.escape(calls)}\)$", printed, re.M), printed
    assert re.search(r"^  fallbacks +0$", printed, re.M), printed


def test_compare_default_reruns_the_unmodified_pipeline(tmp_path, monkeypatch, capsys):
    """--compare-default: a second generation with the pipeline's own processors (no visattn processor
    installed during it), equal to calling the pipeline directly; dense's math matches it."""
    from visattn.pipelines._tiny_pipes import tiny_pipeline

    kw = dict(steps=2, guidance=4.0, seed=0, height=32, width=32, progress=False)  # _gen's, CLI defaults
    direct = tiny_pipeline("unet").generate(**kw)
    installed = []  # per generation: does the UNet hold a visattn processor?
    real_run = _generate_io.run_pipeline

    def spy(pipe, *args, **kwargs):
        installed.append(any(isinstance(p, vp.VisattnProcessor) for p in pipe.unet.attn_processors.values()))
        return real_run(pipe, *args, **kwargs)

    monkeypatch.setattr(_generate_io, "run_pipeline", spy)
    out, rep = _gen(tmp_path, monkeypatch, "unet", "dense", "--compare-default", "--format", "npy")
    assert installed == [True, False]  # the method's run, then the default run
    assert rep["files"] == ["dense_seed0.npy"] and rep["default"]["files"] == ["default_seed0.npy"]
    np.testing.assert_array_equal(np.load(out / "default_seed0.npy"), direct)
    cmp = rep["compare_default"]
    assert cmp["speedup"] > 0 and cmp["denoise_speedup"] > 0 and cmp["rel_l2"] < 1e-5  # the same math
    assert rep["default"]["method"] == "default" and rep["default"]["apply_s"] is None
    assert "attention_time_s" not in rep["default"] and "compare_dense" not in rep
    printed = capsys.readouterr().out
    assert re.search(r"^  speedup vs default +[0-9.e+-]+$", printed, re.M), printed
    assert re.search(r"^  denoise_speedup vs default +[0-9.e+-]+$", printed, re.M), printed


def test_generate_bad_input(tmp_path, monkeypatch):
    monkeypatch.setattr(_generate_io, "mp4_unavailable_reason", lambda: "no MP4 writer in this test")
    with pytest.raises(ImportError, match="--format mp4 cannot write videos: no MP4 writer in this test"):
        main(["generate", "--tiny", "wan", "--format", "mp4", "--out", str(tmp_path)])  # before loading
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        main(["generate", "--tiny", "dit", "--method", "nope", "--out", str(tmp_path)])
    with pytest.raises(TypeError, match="unknown NeighborhoodConfig field"):
        main(
            [
                "generate",
                "--tiny",
                "dit",
                "--method",
                "neighborhood",
                "--set",
                "window=3",
                "--out",
                str(tmp_path),
            ]
        )
    with pytest.raises(SystemExit):
        main(["generate", "--method", "dense"])  # no source
    assert vp.list_methods()[:2] == ["dense", "neighborhood"] or "dense" in vp.list_methods()


def test_generate_from_a_saved_pipeline_directory(tmp_path):
    """``--model DIR`` loads with DiffusionPipeline.from_pretrained offline (a saved tiny DiTPipeline)."""
    from visattn.pipelines._tiny_pipes import TinyDiT

    TinyDiT(sample_size=8).pipe.save_pretrained(tmp_path / "dit")
    out = tmp_path / "run"
    rc = main(
        [
            "generate",
            "--model",
            str(tmp_path / "dit"),
            "--method",
            "neighborhood",
            "--set",
            "backend=torch",
            "--set",
            "kernel_size=[3,3]",
            "--steps",
            "2",
            "--guidance",
            "2.0",
            "--class-label",
            "3",
            "--out",
            str(out),
            "--no-progress",
            "--offline",
        ]
    )
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["source"] == str(tmp_path / "dit") and rep["total_calls"] == 2 * 2 and rep["fallbacks"] == {}
    assert (out / "neighborhood_seed0.png").is_file()
