"""The page of `elta serve` in a real browser: headless Chromium (Debian's package, driven by Playwright) uploads
two photos, shows a card per photo with the same scores the API gives, and sorts them; the screenshot is kept."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serve_process import calibrated_run, running_server  # noqa: E402

CHROMIUM = os.environ.get("ELTA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync", "--disable-quic",
]  # fmt: skip


def _browser_or_skip():
    """Playwright's sync API and a Chromium executable; missing ones skip locally and fail in CI."""
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason, sync_playwright = "the playwright package is not installed", None
    if reason is None and not Path(CHROMIUM).exists():
        reason = f"no Chromium at {CHROMIUM} (apt-get install chromium, or set ELTA_CHROMIUM)"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI: {reason}")
        pytest.skip(reason)
    return sync_playwright


@pytest.fixture(scope="module")
def checkpoint(demo_data, tmp_path_factory):
    """A tiny trained run with an affine calibration map, so the page shows both scores."""
    return calibrated_run(demo_data, tmp_path_factory.mktemp("serve_browser"))[1]


def test_the_page_scores_two_dropped_photos_as_the_api_does(checkpoint, demo_data, tmp_path):
    sync_playwright = _browser_or_skip()
    photos = [demo_data / "images" / name for name in ("4.jpg", "7.jpg")]
    with running_server(checkpoint, tmp_path / "serve.log") as (url, _):
        api = httpx.post(
            f"{url}/v1/score", files=[("files", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
        ).json()["images"]
        expected = {image["name"]: image for image in api}
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 760})
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                outside: list[str] = []
                page.on(
                    "request",
                    lambda r: None if r.url.startswith((url, "blob:", "data:")) else outside.append(r.url),
                )
                page.goto(url)
                page.wait_for_function(
                    "document.getElementById('model').textContent.includes('test_convnext')"
                )
                page.set_input_files("#files", [str(p) for p in photos])
                page.wait_for_selector(".card .score[data-score]", state="attached")
                page.wait_for_function("document.querySelectorAll('.card .score[data-score]').length === 2")
                cards = page.eval_on_selector_all(
                    ".card",
                    """cards => cards.map(c => ({
                        name: c.dataset.name,
                        score: parseFloat(c.querySelector('.score').dataset.score),
                        shown: c.querySelector('.score').textContent,
                        uncalibrated: c.querySelector('.uncalibrated')?.textContent ?? '',
                        percentile: c.querySelector('.percentile')?.textContent ?? '',
                        votes: c.querySelectorAll('svg.votes rect').length,
                        training: c.querySelectorAll('svg.training line').length,
                        thumbnail: c.querySelector('img').naturalWidth,
                    }))""",
                )
                shot = tmp_path / "serve.png"
                page.screenshot(path=str(shot), full_page=True)
                page.select_option("#sort", "asc")
                ascending = page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.name)")
            finally:
                browser.close()
    assert not errors, errors
    assert not outside, f"the page fetched from elsewhere: {outside}"
    assert {card["name"] for card in cards} == set(expected)
    for card in cards:
        image = expected[card["name"]]
        assert card["score"] == pytest.approx(image["score"], abs=1e-9)
        assert card["shown"] == f"{image['score']:.2f}"
        assert f"{image['score_uncalibrated']:.2f}" in card["uncalibrated"]
        n = round(image["percentile"])
        suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
        assert f"at the {n}{suffix} percentile" in card["percentile"]
        assert card["votes"] == 10 and card["training"] == 1 and card["thumbnail"] > 0
    best_first = sorted(expected, key=lambda name: -expected[name]["score"])
    assert [card["name"] for card in cards] == best_first  # the page opens sorted best first
    assert ascending == best_first[::-1]
    assert shot.stat().st_size > 10_000
    if os.environ.get("ELTA_ARTIFACTS"):
        artifacts = Path(os.environ["ELTA_ARTIFACTS"])
        artifacts.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, artifacts / "serve.png")
