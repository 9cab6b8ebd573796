"""``elta ablate``: train each variant with the same data, split and seeds, and compare them.

A variant is ``baseline`` or enhancers joined by ``+``, each optionally with settings:
``tfa``, ``flsa``, ``tfa+flsa``, ``tfa:tau1=0.3+flsa:weight=0.1``. The token ``apds`` adds one round of
APDS self-training on ``--unlabeled`` images; its settings are ``beta`` and ``threshold`` (given together),
``min_selected``, and the search grids ``betas`` / ``thresholds`` as ``;``-separated lists
(``apds:thresholds=0.3;0.4;0.5``). The token ``calibration[:method=affine|quantile|isotonic|auto]`` evaluates
the variant it is joined to (``baseline+calibration``) through a post-hoc map fitted on the validation
predictions; it reuses that variant's runs. The token ``scalar`` trains with the scalar head (MSE on the
MOS) instead of the distribution head, as do enhancers that declare they need a scalar head (``bmc``).
Every (variant, seed) run lives in ``OUT/runs/<variant>/seed<k>`` and is resumed or reused when the command
is run again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from elta.calibration import METHODS as CALIBRATION_METHODS
from elta.calibration import choose_calibration
from elta.config import RunConfig
from elta.engine.evaluate import check_readable, score_metrics, select_split, write_evaluation
from elta.engine.features import load_or_compute_features
from elta.engine.predictor import Predictor
from elta.engine.prepare import read_dataset
from elta.engine.runtime import Runtime
from elta.engine.trainer import train
from elta.enhancers import parse_enhancer, scalar_head_users
from elta.errors import ConfigError
from elta.utils import atomic_write_text
from elta.workflows.selftrain import self_train

__all__ = ["parse_variant", "apds_settings", "run_ablation", "summarise", "COLUMNS"]

log = logging.getLogger(__name__)

# (metric, which value is best): the largest, the smallest, the closest to zero or the closest to one;
# mae_tail is the mean of the low- and high-bucket MAE (what `calibrate --method auto` minimises)
COLUMNS: list[tuple[str, str]] = [
    *((k, "max") for k in ("plcc", "srcc", "acc")),
    *((k, "min") for k in ("mae", "mae_low", "mae_medium", "mae_high", "mae_tail")),
    *((k, "zero") for k in ("bias_low", "bias_high")),
    ("spread", "one"),
]


APDS_SETTINGS = ("beta", "threshold", "min_selected", "betas", "thresholds")


def _tokens(name: str) -> list[dict]:
    return [parse_enhancer(token) for token in name.strip().split("+")]


NOT_ENHANCERS = ("apds", "calibration", "baseline", "scalar")


def parse_variant(name: str) -> list[dict]:
    """``"tfa:tau1=0.3+flsa"`` -> enhancer specs; ``"baseline"`` -> []; the ``apds`` and ``calibration``
    tokens are not enhancers (see :func:`apds_settings`, :func:`calibration_settings`) and are left out."""
    return [t for t in _tokens(name) if t["name"] not in NOT_ENHANCERS]


def calibration_settings(name: str) -> dict | None:
    """``{"method": …}`` of the variant's ``calibration[:method=affine|quantile|isotonic|auto]`` token, or None."""
    found = [t for t in _tokens(name) if t["name"] == "calibration"]
    if not found:
        return None
    settings = {"method": "affine", **{k: v for k, v in found[0].items() if k != "name"}}
    methods = ("auto", *CALIBRATION_METHODS)
    if set(settings) != {"method"} or settings["method"] not in methods:
        raise ConfigError(f"variant {name}: calibration takes method={'|'.join(methods)}")
    return settings


def variant_loss(name: str, base_loss: str) -> str:
    """The training loss of a variant: ``scalar``, or an enhancer that needs a scalar head, trains with MSE
    (unless the base loss is already a scalar head's)."""
    tokens = _tokens(name)
    scalar = any(t["name"] == "scalar" for t in tokens) or scalar_head_users(tokens)
    return "mse" if scalar and base_loss not in ("mse", "l1") else base_loss


def training_variant(name: str) -> str:
    """The part of a variant that decides training: a calibration token only changes the evaluation."""
    kept = [token for token in name.strip().split("+") if token.split(":")[0].strip() != "calibration"]
    return "+".join(kept) or "baseline"


def apds_settings(name: str) -> dict | None:
    """Settings of the variant's ``apds[:beta=…,threshold=…,min_selected=…]`` token; None without one."""
    found = [t for t in _tokens(name) if t["name"] == "apds"]
    if not found:
        return None
    settings = {k: v for k, v in found[0].items() if k != "name"}
    unknown = set(settings) - set(APDS_SETTINGS)
    if unknown:
        raise ConfigError(
            f"variant {name}: unknown apds setting(s) {sorted(unknown)}; known: {APDS_SETTINGS}"
        )
    for key in ("betas", "thresholds"):  # grids are written with ';' inside a variant: thresholds=0.3;0.4
        if key in settings:
            settings[key] = [float(v) for v in str(settings[key]).split(";")]
    return settings


def _predict_split(predictor: Predictor, frame, split: str, cache_path: Path | None):
    if cache_path is None:
        return predictor.predict_frame(frame)
    # frozen backbone: the evaluation splits' features are cached as well
    cache = load_or_compute_features(cache_path, predictor, {split: frame})[split]
    return predictor.predict_features(frame, cache.features, cache.failed)


def _evaluate_run(
    cfg: RunConfig,
    run_dir: Path,
    split: str,
    cache_path: Path | None,
    progress: bool,
    calibration: dict | None,
) -> dict:
    """Test metrics of ``run_dir/best.pt``; with ``calibration`` a map fitted on the val split is applied."""
    out = run_dir / ("eval" if calibration is None else f"eval_calibration_{calibration['method']}")
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    runtime = Runtime.from_config(cfg.runtime, progress=progress)
    predictor = Predictor.from_checkpoint(run_dir / "best.pt", runtime)
    spec = predictor.spec
    df = read_dataset(cfg).frame
    frame = select_split(df, split)
    preds = _predict_split(predictor, frame, split, cache_path)
    if calibration is not None:
        if not (df["split"] == "val").any():
            raise ConfigError(f"{cfg.data.data}: the calibration variant needs a val split to fit its map on")
        val = select_split(df, "val")
        val_preds = _predict_split(predictor, val, "val", cache_path)
        check_readable(val_preds, f"split 'val' of {cfg.data.data}")
        ok, val_gt = val_preds.ok, val["mos"].to_numpy(dtype=np.float64)
        train_gt = df.loc[df["split"] == "train", "mos"].to_numpy(dtype=np.float64)
        fit = {"score_range": tuple(spec.score_range), "train_gt": train_gt}
        cal = choose_calibration(val_preds.score[ok], val_gt[ok], calibration["method"], **fit).calibration
        if cal is not None:  # auto may keep the model's own scores
            preds = dataclasses.replace(preds, score=cal.apply(preds.score), uncalibrated=preds.score)
    metrics = score_metrics(frame, preds, spec, f"split '{split}' of {cfg.data.data}")
    metrics.update(split=split, checkpoint=str(run_dir / "best.pt"))
    if calibration is not None:
        metrics["calibration"] = calibration["method"]
    write_evaluation(out, frame, preds, spec, metrics, title=f"{run_dir.parent.name} / {run_dir.name}")
    return metrics


def run_ablation(
    base: RunConfig,
    variants: list[str],
    seeds: int,
    out: str | Path,
    *,
    unlabeled: list[str] | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Train and evaluate every variant on seeds ``base.train.seed … + seeds − 1``; write the tables.

    A variant with ``apds`` self-trains one round on ``unlabeled`` images; its student is evaluated.
    """
    out = Path(out)
    if any(apds_settings(v) is not None for v in variants) and not unlabeled:
        raise ConfigError("the apds variant self-trains on unlabelled images: give --unlabeled PATH…")
    out.mkdir(parents=True, exist_ok=True)
    specs = {v: parse_variant(v) for v in variants}  # bad names fail before any training
    for enhancers in specs.values():
        dataclasses.replace(base, enhancers=enhancers)  # validates every variant's settings now
    split = "test" if (read_dataset(base).frame["split"] == "test").any() else "val"
    if split == "val":
        log.warning("%s has no test split: the ablation compares validation metrics", base.data.data)
    cache_path = out / "feature_cache.pt" if base.train.cache_features else None
    rows = []
    for seed in range(base.train.seed, base.train.seed + seeds):
        for variant, enhancers in specs.items():
            folder = re.sub(r"[^A-Za-z0-9_.+=-]", "_", training_variant(variant))
            run_dir = out / "runs" / folder / f"seed{seed}"
            feature_cache = str(cache_path) if cache_path else base.train.feature_cache
            loss = variant_loss(variant, base.train.loss)
            train_cfg = dataclasses.replace(base.train, seed=seed, feature_cache=feature_cache, loss=loss)
            cfg = dataclasses.replace(base, enhancers=enhancers, train=train_cfg)
            log.info("ablation: %s, seed %d -> %s", variant, seed, run_dir)
            apds = apds_settings(variant)
            if apds is not None:
                result = self_train(cfg, run_dir, unlabeled, rounds=1, progress=progress, **apds)
                run_dir = Path(result["stages"][-1]["run_dir"])
            else:
                train(cfg, run_dir, resume=True, progress=progress)
            metrics = _evaluate_run(cfg, run_dir, split, cache_path, progress, calibration_settings(variant))
            values = {k: metrics.get(k) for k, _ in COLUMNS}
            values["mae_tail"] = (metrics["mae_low"] + metrics["mae_high"]) / 2
            rows.append({"variant": variant, "seed": seed, **values, "n": metrics.get("n")})
    table = pd.DataFrame(rows)
    atomic_write_text(out / "ablation.csv", table.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(out / "ablation.md", summarise(table, variants, split))
    return table


def _best_index(values: pd.Series, best: str) -> object:
    """Index of the best value: ``best`` is ``max``, ``min``, ``zero`` (closest to 0) or ``one`` (closest to 1)."""
    clean = values.dropna()
    distance = {"max": -clean, "min": clean, "zero": clean.abs(), "one": (clean - 1.0).abs()}[best]
    return None if clean.empty else distance.idxmin()


def summarise(table: pd.DataFrame, variants: list[str], split: str) -> str:
    """Markdown: mean ± sd over seeds per variant (best marked in bold) and paired differences from baseline."""
    seeds = sorted(table["seed"].unique())
    means = table.groupby("variant")[[k for k, _ in COLUMNS]].agg(["mean", "std"])
    lines = [
        f"Test metrics on the `{split}` split, mean ± sd over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}). "
        "Bold: the best value per column (bias: closest to 0; spread: closest to 1).",
        "",
        "| variant | " + " | ".join(k for k, _ in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    best = {k: _best_index(means[(k, "mean")], d) for k, d in COLUMNS}
    for variant in variants:
        cells = []
        for k, _ in COLUMNS:
            mean, sd = means.loc[variant, (k, "mean")], means.loc[variant, (k, "std")]
            text = f"{mean:.4f}" + (f" ± {sd:.4f}" if len(seeds) > 1 and np.isfinite(sd) else "")
            cells.append(f"**{text}**" if best[k] == variant else text)
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    if "baseline" in variants and len(variants) > 1:
        lines += [
            "",
            "Paired difference from the baseline on the same seed (variant − baseline), mean ± sd:",
            "",
            "| variant | " + " | ".join(f"Δ{k}" for k, _ in COLUMNS) + " |",
            "|---|" + "---|" * len(COLUMNS),
        ]
        base = table[table["variant"] == "baseline"].set_index("seed")
        for variant in [v for v in variants if v != "baseline"]:
            own = table[table["variant"] == variant].set_index("seed")
            cells = []
            for k, _ in COLUMNS:
                diff = (own[k] - base[k]).dropna()
                sd = f" ± {diff.std():.4f}" if len(diff) > 1 else ""
                cells.append(f"{diff.mean():+.4f}{sd}")
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
