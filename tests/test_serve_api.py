"""The scoring service through FastAPI's test client: the same scores as `elta predict`, the model description,
every kind of bad upload answered with a clear 4xx while the service keeps serving, and the token."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

import elta  # noqa: E402
from elta.cli import main  # noqa: E402
from elta.errors import UnavailableError  # noqa: E402
from elta.models.checkpoint import load_checkpoint  # noqa: E402
from elta.models.model import score_quantiles  # noqa: E402
from elta.workflows.serve import Batcher, ServeSettings, create_app  # noqa: E402
from serve_process import calibrated_run  # noqa: E402

CPU = ["--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="module")
def checkpoints(demo_data, tmp_path_factory):
    """A tiny trained run and a copy of its best.pt with an affine calibration map fitted on the val split."""
    return calibrated_run(demo_data, tmp_path_factory.mktemp("serve_api"))


@pytest.fixture(scope="module")
def predictor(checkpoints):
    return elta.load(checkpoints[1], device="cpu", workers=0)


@pytest.fixture(scope="module")
def client(predictor):
    with TestClient(create_app(predictor, ServeSettings(max_files=4, max_upload_mb=0.5))) as client:
        yield client


@pytest.fixture(scope="module")
def photos(demo_data):
    return [demo_data / "images" / f"{i}.jpg" for i in (1, 2, 3)]


def _upload(*items: tuple[str, bytes]) -> list:
    return [("files", (name, data, "application/octet-stream")) for name, data in items]


def _still_serving(client, photo) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    good = client.post("/v1/score", files=_upload((photo.name, photo.read_bytes())))
    assert good.status_code == 200 and good.json()["images"][0]["error"] is None


def test_a_trained_checkpoint_records_its_training_score_distribution(checkpoints, demo_data):
    spec = load_checkpoint(checkpoints[0]).spec
    votes = pd.read_csv(demo_data / "AVA.txt", sep=" ", header=None).set_index(1)[list(range(2, 12))]
    mos = (votes.to_numpy() * np.arange(1, 11)).sum(1) / votes.to_numpy().sum(1)
    split = pd.read_csv(checkpoints[0] / "split.csv").set_index("image_id")["split"]
    train_mos = mos[(split.reindex(votes.index) == "train").to_numpy()]
    assert len(spec.score_quantiles) == 101
    assert np.allclose(spec.score_quantiles, score_quantiles(train_mos))
    assert spec.score_quantiles[0] == pytest.approx(train_mos.min())
    assert spec.score_quantiles[-1] == pytest.approx(train_mos.max())
    assert spec.percentile(np.array([np.median(train_mos)]))[0] == pytest.approx(50.0, abs=1.0)


def test_scores_equal_elta_predict_on_the_same_files(client, checkpoints, photos, predictor, tmp_path):
    out = tmp_path / "scores.csv"
    assert (
        main(["predict", *map(str, photos), "--checkpoint", str(checkpoints[1]), "--out", str(out), *CPU])
        == 0
    )
    expected = pd.read_csv(out)
    response = client.post("/v1/score", files=_upload(*((p.name, p.read_bytes()) for p in photos)))
    assert response.status_code == 200, response.text
    images = response.json()["images"]
    assert [image["name"] for image in images] == [p.name for p in photos]
    for image, (_, row) in zip(images, expected.iterrows(), strict=True):
        assert image["error"] is None
        assert image["score"] == pytest.approx(row["score"], abs=1e-5)
        assert image["score_uncalibrated"] == pytest.approx(row["score_uncalibrated"], abs=1e-5)
        assert image["score"] != pytest.approx(image["score_uncalibrated"], abs=1e-6)  # the map did something
        assert image["std"] == pytest.approx(row["std"], abs=1e-5)
        assert np.allclose(
            image["distribution"], row[[f"p{k}" for k in range(1, 11)]].astype(float), atol=1e-5
        )
        assert image["percentile"] == pytest.approx(predictor.spec.percentile([image["score"]])[0])
        assert 0.0 <= image["percentile"] <= 100.0


def test_model_endpoint_describes_scale_calibration_and_training_scores(client):
    info = client.get("/v1/model").json()
    assert info["backbone"] == "test_convnext" and info["dataset"] == "ava"
    assert info["score_range"] == [1.0, 10.0] and info["bins"] == [float(k) for k in range(1, 11)]
    assert info["calibration"]["method"] == "affine" and info["calibration"]["applied"] is True
    assert info["elta_version"] == elta.__version__
    hist = info["training_scores"]["histogram"]
    assert len(hist["edges"]) == len(hist["fraction"]) + 1
    assert sum(hist["fraction"]) == pytest.approx(1.0) and min(hist["fraction"]) >= 0.0
    assert len(info["training_scores"]["quantiles"]) == 101
    docs = client.get("/openapi.json").json()
    assert {"/v1/score", "/v1/model", "/healthz", "/metrics"} <= set(docs["paths"])


def test_an_old_checkpoint_without_training_scores_gets_null_percentiles(checkpoints, photos):
    checkpoint = load_checkpoint(checkpoints[0])
    old = dataclasses.replace(checkpoint, spec=dataclasses.replace(checkpoint.spec, score_quantiles=[]))
    with TestClient(create_app(elta.Predictor.from_checkpoint(old))) as client:
        image = client.post("/v1/score", files=_upload((photos[0].name, photos[0].read_bytes()))).json()
        assert image["images"][0]["percentile"] is None and image["images"][0]["score"] is not None
        assert image["images"][0]["score_uncalibrated"] is None  # no calibration map in this one
        assert client.get("/v1/model").json()["training_scores"] is None


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (12000, 9000)).save(buffer, format="PNG")  # 108 Mpx, a few hundred kB of zeros
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: b"%PDF-1.4 not a photo at all", "not a recognised image file"),
        (lambda p: p.read_bytes()[:300], "corrupt or truncated"),
        (lambda p: _bomb(), "exceeds max_pixels"),
        (lambda p: b"", "not a recognised image file"),
    ],
    ids=["not-an-image", "truncated", "decompression-bomb", "empty"],
)
def test_an_unreadable_upload_is_a_422_naming_the_file_and_why(client, photos, make, reason):
    response = client.post("/v1/score", files=_upload(("bad.jpg", make(photos[0]))))
    assert response.status_code == 422
    body = response.json()
    assert "none of the uploaded files could be read" in body["detail"]
    assert body["images"][0]["name"] == "bad.jpg" and reason in body["images"][0]["error"]
    assert body["images"][0]["score"] is None
    _still_serving(client, photos[0])


def test_with_some_good_photos_the_bad_ones_get_their_error_and_the_rest_is_scored(client, photos):
    response = client.post(
        "/v1/score",
        files=_upload(
            ("a.jpg", photos[0].read_bytes()), ("b.jpg", b"junk"), ("c.jpg", photos[1].read_bytes())
        ),
    )
    assert response.status_code == 200
    a, b, c = response.json()["images"]
    assert a["error"] is None and c["error"] is None and a["score"] != c["score"]
    assert b["score"] is None and "b.jpg" in b["error"] and "not a recognised image" in b["error"]


def test_size_and_count_limits_are_413_with_the_limit_in_the_message(client, photos):
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    big = io.BytesIO()
    # about 1.4 MB: over 0.5 MB per file, under the request's limit
    Image.fromarray(noise).save(big, format="PNG")
    response = client.post("/v1/score", files=_upload(("big.png", big.getvalue())))
    assert response.status_code == 413 and "big.png" in response.json()["detail"]
    assert "0.5 MB limit per file" in response.json()["detail"]
    huge = b"\0" * (4 * 512 * 1024 + 2 * 1024 * 1024)  # over 4 files × 0.5 MB + 1 MB: refused before reading
    response = client.post("/v1/score", files=_upload(("huge.jpg", huge)))
    assert response.status_code == 413 and "at most 4 files of 0.5 MB" in response.json()["detail"]
    response = client.post(
        "/v1/score", files=_upload(*[(f"{i}.jpg", photos[0].read_bytes()) for i in range(5)])
    )
    assert response.status_code == 413 and "5 files in one request; at most 4" in response.json()["detail"]
    _still_serving(client, photos[0])


def test_a_path_on_the_server_is_not_an_upload(client, photos):
    response = client.post("/v1/score", data={"files": str(photos[0])})
    assert response.status_code == 422 and "images" not in response.json()
    assert client.post("/v1/score").status_code in (411, 422)


def test_the_token_guards_the_api_but_not_the_page_or_health(predictor, photos):
    upload = _upload((photos[0].name, photos[0].read_bytes()))
    with TestClient(create_app(predictor, ServeSettings(token="s3cret"))) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = client.post("/v1/score", files=upload, headers=headers)
            assert response.status_code == 401 and "Bearer" in response.json()["detail"]
            assert client.get("/v1/model", headers=headers).status_code == 401
        ok = client.post("/v1/score", files=upload, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["images"][0]["score"] is not None
        assert client.get("/healthz").status_code == 200
        assert client.get("/").status_code == 200 and "Drop photos here" in client.get("/").text
        assert 'elta_requests_total{path="/v1/score",status="401"} 3' in client.get("/metrics").text


def test_the_page_is_self_contained(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page.text


def _metrics(text: str) -> dict[str, float]:
    rows = [line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")]
    return {name: float(value) for name, value in rows}


def test_metrics_count_requests_images_errors_and_batches(client, photos):
    before = client.get("/metrics").text
    client.post("/v1/score", files=_upload(("x.jpg", photos[0].read_bytes()), ("y.jpg", b"no")))
    text = client.get("/metrics").text
    values, old = _metrics(text), _metrics(before)
    assert values["elta_images_total"] == old["elta_images_total"] + 2
    assert values["elta_image_errors_total"] == old["elta_image_errors_total"] + 1
    assert values["elta_batch_images_total"] == old["elta_batch_images_total"] + 1
    assert 'elta_request_latency_seconds{path="/v1/score",quantile="0.99"}' in text


def test_the_batcher_scores_concurrent_requests_together_and_drains_on_stop(predictor, photos):
    inputs = [predictor.transform(Image.open(p).convert("RGB")) for p in photos] * 3  # 9 images
    alone = predictor.predict_images(inputs, normalized=True).score
    sizes = []

    async def run(max_batch: int):
        batcher = Batcher(
            lambda x: predictor.predict_images(x, normalized=True),
            max_batch,
            200,
            lambda n, s: sizes.append(n),
        )
        await batcher.start()
        pending = [asyncio.ensure_future(batcher.submit([x])) for x in inputs]
        await asyncio.sleep(0)  # every request is queued ...
        await batcher.stop()  # ... and stop scores them all before returning: the collector is gone after it
        done, _ = await asyncio.wait(pending, timeout=1.0)
        assert len(done) == len(pending)
        return [task.result()[0] for task in pending]

    results = asyncio.run(run(4))
    assert sizes == [4, 4, 1]
    assert [r.batch_size for r in results] == [4] * 8 + [1]
    assert np.allclose([r.predictions.score[0] for r in results], alone, atol=1e-5)


def test_serve_command_refuses_bad_limits_in_one_line(capsys):
    assert main(["serve", "--checkpoint", "unused.pt", "--max-batch", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["elta serve: error: --max-batch must be ≥ 1; got 0"]


def test_without_fastapi_the_error_names_the_extra(predictor, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(UnavailableError, match=r"pip install 'elta\[serve\]'"):
        create_app(predictor)
