"""The typed config and the command line generated from it: coercion, errors, --print-config, old configs."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import yaml

from conftest import tiny_train_args
from elta.cli import build_parser, main
from elta.config import RunConfig
from elta.errors import ConfigError


def _write(path, raw: dict):
    path.write_text(yaml.safe_dump(raw))
    return path


def _tiny_yaml(demo_data, **train) -> dict:
    return {
        "data": {"data": str(demo_data / "AVA.txt")},
        "model": {"backbone": "test_convnext", "weights": "none", "image_size": 48, "resize": 56},
        "train": {"epochs": 1, "batch_size": 16, **train},
        "runtime": {"device": "cpu", "workers": 0},
    }


def test_yaml_exponent_without_a_dot_is_a_float_and_trains(demo_data, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_tiny_yaml(demo_data)).replace("epochs: 1", "epochs: 1\n  lr: 1e-5"))
    assert yaml.safe_load(config.read_text())["train"]["lr"] == "1e-5"  # what PyYAML makes of it
    cfg = RunConfig.from_yaml(config)
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["lr"] == 1e-5 and saved["runtime"]["device"] == "cpu"


def _printed_config(capsys, argv) -> dict:
    assert main(argv) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_enhancer_settings_are_typed_however_numbers_are_written(tmp_path, capsys):
    raw = _printed_config(
        capsys, ["train", "--print-config", "--enhancer", "tfa:tau1=1e-5,pairs=2", "--flsa-weight", "1e-1"]
    )
    specs = {spec["name"]: spec for spec in raw["enhancers"]}
    tfa, flsa = specs["tfa"], specs["flsa"]
    assert tfa == {"name": "tfa", "tau1": 1e-5, "pairs": 2} and isinstance(tfa["tau1"], float)
    assert flsa == {"name": "flsa", "weight": 0.1}


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--enhancer", "tfa:tau1=fast"], "enhancer tfa, setting tau1: expected a number, got 'fast'"),
        (["--enhancer", "tfb"], "unknown enhancer 'tfb'"),
        (["--tfa-pairs", "1.5"], "enhancer tfa, setting pairs: expected an integer"),
    ],
)
def test_a_bad_enhancer_fails_before_any_work_in_one_line(demo_data, tmp_path, capsys, argv, names):
    run = tmp_path / "run"
    assert main([*tiny_train_args(demo_data, run), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("elta train: error: ") and names in err
    assert not run.exists()


def test_a_value_of_the_wrong_type_is_one_line_naming_the_setting(demo_data, tmp_path, capsys):
    config = _write(tmp_path / "bad.yaml", _tiny_yaml(demo_data, lr="fast"))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err == "elta train: error: train.lr (--lr): expected a number, got 'fast'\n"
    assert main([*tiny_train_args(demo_data, tmp_path / "b"), "--lr", "fast"]) == 2
    assert capsys.readouterr().err == "elta train: error: train.lr (--lr): expected a number, got 'fast'\n"
    with pytest.raises(ConfigError, match=r"data.score_range \(--score-range\): expected a number"):
        RunConfig.from_dict({"data": {"score_range": [1, "ten"]}})
    with pytest.raises(ConfigError, match=r"train.epochs \(--epochs\) must be > 0"):
        RunConfig.from_dict({"train": {"epochs": "0"}})


def test_print_config_round_trips(demo_data, tmp_path, capsys):
    config = _write(tmp_path / "run.yaml", {**_tiny_yaml(demo_data), "enhancers": [{"name": "flsa"}]})
    argv = [
        "train",
        "--print-config",
        "--config",
        str(config),
        "--lr",
        "3e-4",
        "--tfa",
        "--score-range",
        "1",
        "10",
        "--amp",
        "off",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert list(yaml.safe_load(text)) == ["data", "model", "train", "runtime", "enhancers"]
    cfg = RunConfig.from_dict(yaml.safe_load(text))
    assert cfg.train.lr == 3e-4 and cfg.data.score_range == (1.0, 10.0) and cfg.runtime.amp == "off"
    assert [e["name"] for e in cfg.enhancers] == ["flsa", "tfa"]
    assert cfg.yaml_text() == text
    assert not (tmp_path / "run").exists()


def test_a_config_saved_before_the_runtime_section_still_loads(tmp_path):
    old = {
        "data": {"data": "AVA.txt", "workers": 3},
        "train": {"epochs": 2, "device": "cpu", "amp": "off", "channels_last": True, "compile": False},
    }
    cfg = RunConfig.from_yaml(_write(tmp_path / "config.yaml", old))
    assert (cfg.runtime.device, cfg.runtime.workers, cfg.runtime.amp) == ("cpu", 3, "off")
    assert cfg.runtime.channels_last and cfg.train.epochs == 2
    assert "device" not in cfg.to_dict()["train"] and "workers" not in cfg.to_dict()["data"]


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom elta.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['predict', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "import elta.config\nassert 'torch' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "elta", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "usage: elta" in out.stdout
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert "elta.cli" in imported and "torch" not in imported


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_option_has_help():
    for parser in _parsers(build_parser()):
        for action in parser._actions:
            if action.option_strings:
                assert action.help and action.help.strip(), f"{parser.prog} {action.option_strings}"
