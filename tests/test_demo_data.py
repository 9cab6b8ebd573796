"""The demo dataset: AVA layout, determinism, a long-tailed MOS, and a MOS that can be read off the pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from elta.data.demo import demo_dataset_exists, make_demo_dataset

pytest.importorskip("skimage")

RATINGS = np.arange(1, 11)


def _read_ava(path: Path) -> np.ndarray:
    rows = [line.split() for line in path.read_text().splitlines()]
    assert all(len(row) == 15 for row in rows)
    return np.array(rows, dtype=np.int64)


def _mos(table: np.ndarray) -> np.ndarray:
    counts = table[:, 2:12]
    return (counts * RATINGS).sum(1) / counts.sum(1)


def _split(root: Path, name: str) -> list[int]:
    return [int(line) for line in (root / f"{name}.txt").read_text().split()]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("small"), n=120, seed=3, image_size=96)


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("full"), n=1500, seed=0)


def test_layout_is_ava(small: Path) -> None:
    root = small.parent
    assert small.name == "AVA.txt" and demo_dataset_exists(root)
    table = _read_ava(small)
    ids = table[:, 1].tolist()
    assert table[:, 0].tolist() == list(range(1, 121)) and ids == list(range(1, 121))
    assert sorted(int(p.stem) for p in (root / "images").glob("*.jpg")) == ids
    raters = table[:, 2:12].sum(1)
    assert raters.min() >= 50 and raters.max() <= 200 and (table[:, 2:12] >= 0).all()
    assert set(table[:, 12]) <= set(range(1, 6)) and (table[:, 13:] == 0).all()
    parts = [_split(root, name) for name in ("train", "val", "test")]
    assert sorted(sum(parts, [])) == ids  # disjoint and covering
    assert [len(p) for p in parts] == [84, 18, 18]


def test_images_are_rgb_jpegs_of_the_asked_size(small: Path) -> None:
    for path in sorted((small.parent / "images").glob("*.jpg"))[:10]:
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (96, 96)


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = make_demo_dataset(tmp_path / "a", n=30, seed=7, image_size=64)
    b = make_demo_dataset(tmp_path / "b", n=30, seed=7, image_size=64)
    c = make_demo_dataset(tmp_path / "c", n=30, seed=8, image_size=64)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    for name in ("train.txt", "val.txt", "test.txt"):
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes()
    for i in range(1, 31):
        image = f"images/{i}.jpg"
        assert (a.parent / image).read_bytes() == (b.parent / image).read_bytes()
    assert (a.parent / "images/1.jpg").read_bytes() != (c.parent / "images/1.jpg").read_bytes()


def test_rebuild_smaller_leaves_no_stale_images_and_missing_ava_means_incomplete(tmp_path: Path) -> None:
    make_demo_dataset(tmp_path, n=12, seed=0, image_size=32)
    (tmp_path / "AVA.txt").unlink()
    assert not demo_dataset_exists(tmp_path)
    make_demo_dataset(tmp_path, n=6, seed=0, image_size=32)
    assert sorted(int(p.stem) for p in (tmp_path / "images").glob("*.jpg")) == list(range(1, 7))
    assert demo_dataset_exists(tmp_path)


def test_mos_is_long_tailed_like_ava(full: Path) -> None:
    mos = _mos(_read_ava(full))
    assert abs(mos.mean() - 5.4) < 0.15
    assert 0.6 < mos.std() < 1.0
    assert stats.kurtosis(mos) > 0  # heavier tails than a Gaussian
    assert mos.min() < 3 and mos.max() > 8


def _pixel_features(path: Path) -> list[float]:
    """Sharpness, noise, 8x8 blockiness, contrast, colourfulness and clipping of one image."""
    x = np.asarray(Image.open(path), dtype=np.float32)
    g = x.mean(2)
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    col = np.abs(np.diff(g, axis=1)).mean(0)
    return [
        np.log(lap.var() + 1),
        np.log(np.median(np.abs(lap)) + 1),
        col[7::8].mean() / (col.mean() + 1e-6),
        g.std(),
        (x.max(2) - x.min(2)).mean(),
        ((x < 3) | (x > 252)).mean(),
    ]


def _cross_validated_srcc(features: np.ndarray, y: np.ndarray) -> float:
    """Spearman of out-of-fold predictions of a 2-fold quadratic ridge regression of y on the features."""
    z = (features - features.mean(0)) / features.std(0)
    z = np.hstack([z, z**2, np.ones((len(y), 1))])
    pred = np.empty(len(y))
    fold = np.arange(len(y)) % 2
    for f in (0, 1):
        train = fold != f
        w = np.linalg.solve(z[train].T @ z[train] + np.eye(z.shape[1]), z[train].T @ y[train])
        pred[~train] = z[~train] @ w
    return float(stats.spearmanr(pred, y).statistic)


def test_mos_is_predictable_from_simple_pixel_statistics(full: Path) -> None:
    mos = _mos(_read_ava(full))[:400]
    features = np.array([_pixel_features(full.parent / f"images/{i}.jpg") for i in range(1, 401)])
    assert _cross_validated_srcc(features, mos) > 0.6
    # the same regression cannot predict a MOS unrelated to the pixels
    assert abs(_cross_validated_srcc(features, np.random.default_rng(0).permutation(mos))) < 0.25


def test_low_mos_images_are_far_from_their_sources_clean_look(full: Path) -> None:
    table = _read_ava(full)
    mos, source = _mos(table), table[:, 12]
    chosen = np.flatnonzero((mos < 4) | (mos > 6.5))
    features = {i: _pixel_features(full.parent / f"images/{i + 1}.jpg") for i in chosen}
    # the clean look of each source photo (semantic tag 1): its sharpness in its good images
    good = {s: [features[i][0] for i in chosen if source[i] == s and mos[i] > 6.5] for s in set(source)}
    clean = {s: np.median(v) for s, v in good.items()}
    # blur lowers the log Laplacian variance, noise raises it, JPEG adds 8x8 block edges
    dist = {i: abs(features[i][0] - clean[source[i]]) + abs(np.log(features[i][2])) for i in chosen}
    low = [dist[i] for i in chosen if mos[i] < 4]
    high = [dist[i] for i in chosen if mos[i] > 7]
    assert len(low) >= 10 and len(high) >= 10
    auc = stats.mannwhitneyu(low, high).statistic / (len(low) * len(high))
    assert auc > 0.95


def test_hard_difficulty_has_noisier_votes_wider_tails_and_pixels_that_tell_less(tmp_path: Path) -> None:
    made = {
        d: make_demo_dataset(tmp_path / d, n=400, seed=5, image_size=96, difficulty=d)
        for d in ("standard", "hard")
    }
    tables = {d: _read_ava(path) for d, path in made.items()}
    votes = tables["hard"][:, 2:12].sum(1)
    assert votes.min() >= 10 and votes.max() <= 60  # 50-200 in the standard set
    mos = {d: _mos(table) for d, table in tables.items()}
    assert abs(mos["hard"].mean() - 5.4) < 0.2 and mos["hard"].std() > 1.3 * mos["standard"].std()
    srcc = {}
    for d, path in made.items():
        features = np.array([_pixel_features(path.parent / f"images/{i}.jpg") for i in range(1, 401)])
        srcc[d] = _cross_validated_srcc(features, mos[d])
    assert 0.3 < srcc["hard"] < srcc["standard"] - 0.05  # still learnable, but the pixels tell less
    with pytest.raises(ValueError, match="--difficulty extreme: choose one of standard, hard"):
        make_demo_dataset(tmp_path / "x", n=10, difficulty="extreme")
