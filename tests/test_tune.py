"""Hyper-parameter search: setting names, the search file, an Optuna search, kill and resume, NNI trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import tiny_config, tiny_train_args
from elta.cli import main
from elta.config import RunConfig
from elta.engine.trainer import train
from elta.workflows.nni_report import nni_wrap, under_nni
from elta.workflows.tune import DEFAULT_SPACE, apply_params, load_search, run_tune

optuna = pytest.importorskip("optuna")

FINISHED = ("COMPLETE", "PRUNED")


def tiny(data_root, epochs=2) -> RunConfig:
    """A frozen tiny backbone trained on cached features: a trial takes a fraction of a second."""
    return tiny_config(
        data_root, epochs=epochs, model={"freeze_backbone": True}, train={"cache_features": True}
    )


def tune_args(data_root, out, trials) -> list[str]:
    args = tiny_train_args(data_root, out, epochs=2)
    return ["tune", *args[1:], "--trials", str(trials), "--freeze-backbone", "--cache-features"]


def test_apply_params_maps_dotted_names_and_adds_enhancers(demo_data):
    base = RunConfig.from_dict({**tiny(demo_data).to_dict(), "enhancers": [{"name": "tfa", "tau2": 3.0}]})
    cfg = apply_params(
        base,
        {"train.lr": 0.01, "model.neck_dim": 8, "enhancers.tfa.tau1": 0.2, "enhancers.flsa.weight": 5.0},
    )
    assert (cfg.train.lr, cfg.model.neck_dim) == (0.01, 8)
    assert cfg.enhancers == [{"name": "tfa", "tau2": 3.0, "tau1": 0.2}, {"name": "flsa", "weight": 5.0}]
    assert base.enhancers == [{"name": "tfa", "tau2": 3.0}] and base.train.lr == 1e-3  # base untouched
    with pytest.raises(ValueError, match=r"unknown setting 'train\.lrr'; train keys: .*\blr\b"):
        apply_params(base, {"train.lrr": 0.1})
    with pytest.raises(ValueError, match="unknown enhancer in 'enhancers.tfb.tau1'; known: .*tfa"):
        apply_params(base, {"enhancers.tfb.tau1": 0.1})
    with pytest.raises(ValueError, match="unknown setting 'enhancers.tfa.tau3'; tfa settings: pairs, tau1"):
        apply_params(base, {"enhancers.tfa.tau3": 0.1})
    with pytest.raises(ValueError, match="'lr' is not a setting name; use data.KEY"):
        apply_params(base, {"lr": 0.1})


def test_search_file_base_space_and_early_errors(demo_data, tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny(demo_data).to_dict()))
    search = tmp_path / "search.yaml"
    search.write_text(
        "base: base.yaml\n"
        "space:\n"
        "  train.lr: {choices: [1e-5, 1e-4]}\n"  # PyYAML alone reads 1e-5 as a string
        "  model.neck_dim: {low: 8, high: 32, step: 8}\n"
        "  enhancers.tfa.tau2: {low: 2, high: 10}\n"
    )
    base, space = load_search(search)
    assert base["model"]["backbone"] == "test_convnext"
    assert space["train.lr"] == {"choices": [1e-5, 1e-4]}
    from elta.workflows.tune import parse_space

    params = parse_space(space)
    assert params["train.lr"].choices == (1e-5, 1e-4)
    assert params["model.neck_dim"].integer and not params["enhancers.tfa.tau2"].integer

    search.write_text("base: {train: {epochs: 3}}\n")
    assert load_search(search) == ({"train": {"epochs": 3}}, DEFAULT_SPACE)

    search.write_text("space:\n  train.lrr: {choices: [0.1]}\n")
    with pytest.raises(
        ValueError, match=r"search.yaml: unknown setting 'train\.lrr'; train keys: .*batch_size"
    ):
        load_search(search)
    with pytest.raises(ValueError, match="integer setting"):
        parse_space({"train.batch_size": {"low": 8, "high": 32.5}})
    out = tmp_path / "grid"
    with pytest.raises(ValueError, match="--sampler grid needs every setting as .*train.lr is a range"):
        run_tune(tiny(demo_data), {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}}, out, sampler="grid")
    with pytest.raises(ValueError, match=r"train.batch_size = 1 is not a valid setting"):
        run_tune(tiny(demo_data), {"train.batch_size": {"choices": [1, 16]}}, out)
    assert not out.exists()  # refused before any trial or database


def test_tune_finishes_n_trials_and_best_config_trains(demo_data, tmp_path, capsys):
    out = tmp_path / "tune"
    assert main(tune_args(demo_data, out, trials=8)) == 0
    printed = capsys.readouterr().out
    assert "best: trial" in printed and "best.yaml" in printed
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 8 and trials["state"].isin(FINISHED).all()
    assert set(DEFAULT_SPACE) <= set(trials.columns)
    assert trials["run_dir"].map(lambda d: (Path(d) / "metrics.csv").is_file()).all()
    # one backbone pass shared by every trial
    assert (out / "feature_cache.pt").is_file() and not list(out.glob("trials/*/feature_cache.pt"))
    best = RunConfig.from_yaml(out / "best.yaml")
    top = trials[trials["state"] == "COMPLETE"].sort_values("value").iloc[-1]
    assert (
        best.train.lr == pytest.approx(top["train.lr"]) and best.train.batch_size == top["train.batch_size"]
    )
    assert {e["name"] for e in best.enhancers} == {"tfa", "flsa"}
    summary = train(best.override("train", epochs=1), tmp_path / "retrain")
    assert summary["best_epoch"] == 1

    # rerunning a finished search trains nothing more; another space in the same folder is refused
    assert main(tune_args(demo_data, out, trials=8)) == 0
    assert len(pd.read_csv(out / "trials.csv")) == 8
    assert main([*tune_args(demo_data, out, trials=8), "--epochs", "3"]) == 2
    assert "base.train.epochs differ" in capsys.readouterr().err


def _study(out: Path):
    return optuna.load_study(study_name="elta-tune", storage=f"sqlite:///{out / 'study.db'}")


def test_killed_search_resumes_to_exactly_n_trials(demo_data, tmp_path):
    out, n = tmp_path / "tune", 5
    cmd = [sys.executable, "-m", "elta", "-q", *tune_args(demo_data, out, trials=n)]
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started = out / "trials" / "001" / "config.yaml"  # trial 0 is finished once trial 1 starts
    deadline = time.monotonic() + 60
    while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert started.exists(), err.decode()
    before = {t.number: (t.state.name, t.value) for t in _study(out).trials if t.state.name in FINISHED}
    assert 1 <= len(before) < n
    kept = {p: p.stat().st_mtime_ns for p in out.glob("trials/00[0]/*.pt")}

    rerun = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr.decode()
    trials = _study(out).trials
    assert sum(t.state.name in FINISHED for t in trials) == n
    assert all((trials[k].state.name, trials[k].value) == v for k, v in before.items())
    assert kept and all(p.stat().st_mtime_ns == t for p, t in kept.items())
    # trial 1 was killed mid-run: marked failed, its settings tried once more as a new trial
    assert trials[1].state.name == "FAIL"
    twins = [t for t in trials if t.user_attrs.get("retry_of") == 1]
    assert len(twins) == 1 and twins[0].params == trials[1].params and twins[0].state.name in FINISHED
    assert len(pd.read_csv(out / "trials.csv")) == len(trials)


class FakeNNI(types.ModuleType):
    """The three calls a trial makes, recorded."""

    def __init__(self, params: dict) -> None:
        super().__init__("nni")
        self.params, self.intermediate, self.final = params, [], []

    def get_next_parameter(self) -> dict:
        return dict(self.params)

    def report_intermediate_result(self, value) -> None:
        self.intermediate.append(value)

    def report_final_result(self, value) -> None:
        self.final.append(value)


def test_nni_trial_applies_parameters_and_reports(demo_data, tmp_path, monkeypatch):
    cfg = tiny(demo_data, epochs=3)
    monkeypatch.delenv("NNI_PLATFORM", raising=False)
    monkeypatch.delenv("NNI_TRIAL_COMMAND_CHANNEL", raising=False)
    monkeypatch.setitem(sys.modules, "nni", None)  # importing nni outside NNI would fail
    same, on_epoch, final = nni_wrap(cfg)
    assert same is cfg and on_epoch is None
    final({"best_metric": 0.5, "metric": "srcc"})
    monkeypatch.setenv("NNI_PLATFORM", "unittest")  # NNI's standalone mode
    assert not under_nni()

    fake = FakeNNI({"enhancers.flsa.weight": 5, "tau_1": 0.2, "train.lr": 3e-3, "batch_size": 32})
    monkeypatch.setitem(sys.modules, "nni", fake)
    monkeypatch.setenv("NNI_PLATFORM", "local")
    cfg, on_epoch, final = nni_wrap(cfg)
    assert (cfg.train.lr, cfg.train.batch_size) == (3e-3, 32)
    assert cfg.enhancers == [{"name": "flsa", "weight": 5}, {"name": "tfa", "tau1": 0.2}]
    summary = train(cfg, tmp_path / "run", on_epoch=on_epoch)
    final(summary)
    srcc = pd.read_csv(tmp_path / "run" / "metrics.csv")["val_srcc"].tolist()
    assert fake.intermediate == pytest.approx(srcc) and len(srcc) == 3
    assert fake.final == [summary["best_metric"]] and summary["best_metric"] == pytest.approx(max(srcc))


def test_examples_search_the_originals_space():
    examples = Path(__file__).resolve().parents[1] / "examples"
    base, space = load_search(examples / "search.yaml")
    assert space == DEFAULT_SPACE
    RunConfig.from_dict(base)
    nni_space = json.loads((examples / "nni" / "search_space.json").read_text())
    assert {k: {"choices": v["_value"]} for k, v in nni_space.items()} == DEFAULT_SPACE
    nni_cfg = yaml.safe_load((examples / "nni" / "config.yml").read_text())
    assert nni_cfg["searchSpaceFile"] == "search_space.json" and nni_cfg["maxTrialNumber"] == 8
    assert nni_cfg["tuner"] == {"name": "TPE", "classArgs": {"optimize_mode": "maximize"}}


def test_elta_train_reports_to_nni_when_run_as_a_trial(demo_data, tmp_path, monkeypatch):
    from conftest import tiny_train_args
    from elta.cli import main

    fake = FakeNNI({"train.lr": 2e-3})
    monkeypatch.setitem(sys.modules, "nni", fake)
    monkeypatch.setenv("NNI_PLATFORM", "local")
    assert main(tiny_train_args(demo_data, tmp_path / "run", epochs=2)) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["lr"] == 2e-3  # the tuner's parameter was applied
    assert len(fake.intermediate) == 2 and fake.final == [max(fake.intermediate)]
