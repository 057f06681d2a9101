"""Bad input to ``visattn train``: clear errors, exit code 2, nothing overwritten."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from visattn.cli._config import ConfigError, load_config
from visattn.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "train" / "demo_digits.yaml"
TINY = [
    "--model",
    "test_vit",
    "--model-kwargs",
    "img_size=16",
    "patch_size=4",
    "--digits-size",
    "16",
    "--img-size",
    "16",
    "--no-progress",
    "--epochs",
    "1",
    "--warmup-epochs",
    "0",
]


def _fails(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    return err


def _write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_close_and_valid_keys(tmp_path, capsys):
    cfg = _write(tmp_path, "model: test_vit\ndataset: digits\ndrop_pth: 0.1\n")
    err = _fails(
        capsys,
        ["train", "--config", str(cfg)],
        "unknown config key 'drop_pth'",
        "Did you mean drop_path",
        "Valid keys:",
    )
    assert "layer_decay" in err


@pytest.mark.parametrize(
    "text, needle",
    [
        (
            "model: test_vit\ndataset: digits\nepochs: three\n",
            "expected epochs to be int, got epochs='three'",
        ),
        ("model: test_vit\ndataset: digits\namp: 'yes'\n", "expected amp to be bool"),
        ("model: test_vit\ndataset: digits\nscale: [0.5]\n", "expected scale to hold 2 numbers"),
        ("model: test_vit\ndataset: imagenet\n", "expected dataset to be"),
        ("dataset: digits\n", "no model given"),
        ("- a\n- b\n", "must hold a mapping"),
        (
            "model: test_vit\nmodel_kwargs: {drop_path_rate: 0.1}\ndataset: digits\n",
            "drop_path_rate (use `drop_path`)",
        ),
    ],
)
def test_bad_values(tmp_path, capsys, text, needle):
    _fails(capsys, ["train", "--config", str(_write(tmp_path, text))], needle)


def test_missing_config_file(tmp_path, capsys):
    _fails(capsys, ["train", "--config", str(tmp_path / "nope.yaml")], "config file not found")


def test_unknown_model_suggests_close_names(tmp_path, capsys):
    _fails(
        capsys,
        ["train", "--config", str(DEMO), "--output", str(tmp_path), "--model", "test_vitt"],
        "unknown model 'test_vitt'",
        "Did you mean",
        "test_vit",
    )
    assert not any(tmp_path.iterdir())


def test_model_kwargs_are_type_checked(tmp_path, capsys):
    base = [
        "train",
        "--config",
        str(DEMO),
        "--output",
        str(tmp_path),
        *TINY[:2],
        "--epochs",
        "1",
        "--no-progress",
    ]
    _fails(
        capsys,
        [*base, "--model-kwargs", "img_size=16", "qkv_bias=false"],
        "expected qkv_bias of type bool",
        "'false'",
    )
    _fails(capsys, [*base, "--model-kwargs", "img_size=16", "not_a_kwarg=1"], "not_a_kwarg")
    _fails(capsys, [*base, "--model-kwargs", "img_size"], "expected --model-kwargs as key=value")


def test_missing_data_folder(tmp_path, capsys):
    _fails(
        capsys,
        [
            "train",
            "--config",
            str(DEMO),
            "--output",
            str(tmp_path),
            "--dataset",
            "",
            "--data-dir",
            str(tmp_path / "absent"),
        ],
        "data folder not found",
    )
    _fails(
        capsys,
        ["train", "--config", str(DEMO), "--output", str(tmp_path), "--dataset", ""],
        "no data folder given",
    )
    assert not any(tmp_path.iterdir())


def test_every_key_has_a_flag_and_recipes_use_train_py_names():
    cfg = load_config(DEMO)
    assert cfg["model"] and cfg["dataset"] == "digits"
    with pytest.raises(ConfigError, match="unknown config key 'lr_sched'"):
        load_config(DEMO, {"lr_sched": "cosine"})


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--config", str(DEMO), "--output", str(out), "--experiment", "a", *TINY]) == 0
    return out


def test_existing_run_is_not_overwritten_without_resume(one_epoch_run, capsys):
    before = _digest(one_epoch_run / "a" / "last.pth.tar")
    _fails(
        capsys,
        ["train", "--config", str(DEMO), "--output", str(one_epoch_run), "--experiment", "a", *TINY],
        "already holds a run",
        "--resume auto",
    )
    assert _digest(one_epoch_run / "a" / "last.pth.tar") == before


def test_resume_refuses_checkpoint_of_another_architecture(one_epoch_run, capsys, tmp_path):
    ckpt = one_epoch_run / "a" / "last.pth.tar"
    before = _digest(ckpt)
    _fails(
        capsys,
        [
            "train",
            "--config",
            str(DEMO),
            "--output",
            str(tmp_path),
            "--experiment",
            "b",
            "--model",
            "test_convnext",
            "--model-kwargs",
            "--no-progress",
            "--resume",
            str(ckpt),
        ],
        "is for another model",
        "arch: checkpoint 'test_vit', config 'test_convnext'",
    )
    assert _digest(ckpt) == before and not (tmp_path / "b").exists()


def test_truncated_checkpoint_is_detected_before_resuming(one_epoch_run, capsys, tmp_path):
    import shutil

    run = tmp_path / "c"
    shutil.copytree(one_epoch_run / "a", run)
    good = (run / "last.pth.tar").read_bytes()
    (run / "previous.pth.tar").write_bytes(good)
    (run / "last.pth.tar").write_bytes(good[: len(good) // 2])
    truncated = _digest(run / "last.pth.tar")
    _fails(
        capsys,
        [
            "train",
            "--config",
            str(DEMO),
            "--output",
            str(tmp_path),
            "--experiment",
            "c",
            *TINY,
            "--epochs",
            "2",
            "--resume",
            "auto",
        ],
        "corrupt or truncated",
        "previous.pth.tar",
    )
    assert _digest(run / "last.pth.tar") == truncated and (run / "previous.pth.tar").read_bytes() == good
    # the kept previous checkpoint resumes
    assert (
        main(
            [
                "train",
                "--config",
                str(DEMO),
                "--output",
                str(tmp_path),
                "--experiment",
                "c",
                *TINY,
                "--epochs",
                "2",
                "--resume",
                str(run / "previous.pth.tar"),
            ]
        )
        == 0
    )


def test_not_a_training_checkpoint(tmp_path, capsys):
    import torch

    p = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(1)}, p)
    _fails(
        capsys,
        ["train", "--config", str(DEMO), "--output", str(tmp_path), *TINY, "--resume", str(p)],
        "not a visattn training checkpoint",
        "initial_checkpoint",
    )
