"""The ``visattn`` command: info, bench, console script / module entry points, and README contract."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from visattn.cli.main import main

ROOT = Path(__file__).resolve().parents[2]


def test_info_lists_backends_with_reasons(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "triton" in out and "flex" in out
    assert re.search(r"block_sparse\s+triton, torch, flex", out)
    # each backend line says available or gives its reasons
    section = out.split("backends:")[1].split("ops:")[0].splitlines()
    for name in ("triton", "torch", "flex", "natten"):
        line = next(ln for ln in section if ln.strip().startswith(name + " "))
        assert re.search(r"\b(available|unavailable: .+)$", line), line


def test_python_dash_m_info_runs():
    res = subprocess.run([sys.executable, "-m", "visattn", "info"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "backends:" in res.stdout


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "bench" in capsys.readouterr().out


def test_bench_help_documents_choices(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--methods", "--shape", "--dtype", "--densities", "--modes", "--backends", "--out"):
        assert flag in out


def test_bench_small_run_writes_json_markdown_png(tmp_path, capsys):
    out_dir = tmp_path / "res"
    code = main(["bench", "--device", "cpu", "--shape", "1,2,200,32", "--block", "32", "--densities", "1,0.5",
                 "--modes", "fwd,fwd+bwd", "--backends", "torch", "--out", str(out_dir)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "CPU timings" in printed
    data = json.loads((out_dir / "bench.json").read_text())
    assert data["environment"]["cpu_timings"] is True
    rows = data["rows"]
    # one dense SDPA row per mode, one torch row per (density, mode)
    assert sorted({(r["backend"], r["mode"]) for r in rows}) == [
        ("sdpa", "fwd"), ("sdpa", "fwd+bwd"), ("torch", "fwd"), ("torch", "fwd+bwd")]
    assert len([r for r in rows if r["backend"] == "torch"]) == 4
    for r in rows:
        assert r["ms"] > 0 and r["ideal"] >= 1.0
        assert abs(r["efficiency"] - r["speedup"] / r["ideal"]) < 1e-6
    md = (out_dir / "bench.md").read_text()
    assert "| case | density |" in md and "CPU timings" in md
    assert (out_dir / "bench.png").stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (["--methods", "nope"], "unknown methods"),
    (["--modes", "sideways"], "expected modes"),
    (["--shape", "1,2,3"], "expected --shape"),
    (["--densities", "a,b"], "expected comma-separated numbers"),
])
def test_bench_bad_arguments(args, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        main(["bench", "--device", "cpu", "--out", str(tmp_path), *args])


def test_import_is_light():
    # timm (a required dependency) imports triton itself; visattn must not define or compile its kernels
    code = ("import sys, visattn; bad = [m for m in ('diffusers', 'visattn.kernels.block_sparse', "
            "'visattn.kernels.neighborhood', 'visattn.pipelines') if m in sys.modules]; print(bad)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- (main|test)-command -->\n```bash\n(.*?)\n```", readme, re.S)
    assert [b[0] for b in blocks] == ["main", "test"]
    main_cmd, test_cmd = blocks[0][1], blocks[1][1]
    assert "visattn bench" in main_cmd and '".[bench]"' in main_cmd
    assert "pytest" in test_cmd and '".[test]"' in test_cmd
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci and test_cmd in ci  # .ci/run runs the same command and checks README


def test_pipelines_import_names_the_extra():
    code = "import visattn.pipelines"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    try:
        import diffusers  # noqa: F401
    except ImportError:
        assert res.returncode != 0
        assert 'pip install "visattn[diffusers]"' in res.stderr
    else:
        assert res.returncode == 0, res.stderr
