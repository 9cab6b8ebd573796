"""Bad input on the command line is one line `elta COMMAND: error: MESSAGE` and exit 2; a bug is a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import tiny_train_args
from elta.cli import main, score


@pytest.fixture(scope="module")
def checkpoint(demo_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("errors") / "run"
    assert main(tiny_train_args(demo_data, run, backbone="test_resnet")) == 0
    return run / "best.pt"


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"elta {command}: error: "), err
    return err


@pytest.mark.parametrize(
    ("enhancer", "names"),
    [
        ("lds:width=3", "unknown setting"),
        ("lds:ks=4", "ks must be an odd number"),
        ("lds:sigma=-1", "sigma must be > 0"),
        ("lds:kernel=box", "kernel must be one of"),
    ],
)
def test_bad_enhancer_settings_are_one_line(demo_data, tmp_path, capsys, enhancer, names):
    argv = [*tiny_train_args(demo_data, tmp_path / "run"), "--enhancer", enhancer]
    assert main(argv) == 2
    assert names in _one_error_line(capsys, "train")


def test_a_text_file_as_checkpoint_is_one_line(demo_data, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint\n")
    image = demo_data / "images" / "1.jpg"
    assert main(["predict", "--checkpoint", str(notes), str(image), "--device", "cpu"]) == 2
    assert "notes.txt" in _one_error_line(capsys, "predict")


def test_predict_on_a_folder_without_images_is_one_line(checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no photos here\n")
    assert main(["predict", "--checkpoint", str(checkpoint), str(empty), "--device", "cpu"]) == 2
    assert "no image files" in _one_error_line(capsys, "predict")


def test_evaluate_on_a_dataset_with_other_bins_is_one_line(checkpoint, tmp_path, capsys):
    para = Path(__file__).parent / "fixtures" / "annotations" / "para"  # 9 bins on 1..5; the model has 10
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(para), "--split", "all"]
    argv += ["--images", str(tmp_path), "--out", str(tmp_path / "eval"), "--device", "cpu", "--workers", "0"]
    assert main(argv) == 2
    assert "10 rating bins but the dataset has 9" in _one_error_line(capsys, "evaluate")


def test_evaluate_on_an_empty_split_is_one_line(checkpoint, demo_data, tmp_path, capsys):
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(demo_data / "AVA.txt")]
    argv += ["--split", "holdout", "--out", str(tmp_path / "eval"), "--device", "cpu", "--workers", "0"]
    assert main(argv) == 2
    assert "no rows in split 'holdout'" in _one_error_line(capsys, "evaluate")


def test_cuda_on_a_machine_without_it_is_one_line(demo_data, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = [*tiny_train_args(demo_data, tmp_path / "run"), "--device", "cuda"]
    assert main(argv) == 2
    assert "cuda" in _one_error_line(capsys, "train").lower()


def test_a_bug_in_a_command_shows_its_traceback(monkeypatch, tmp_path, capsys):
    def broken(args):
        raise ValueError("boom")

    monkeypatch.setattr(score, "predict", broken)
    with pytest.raises(ValueError, match="boom"):
        main(["predict", "--checkpoint", str(tmp_path / "x.pt"), str(tmp_path)])
    assert "error:" not in capsys.readouterr().err
