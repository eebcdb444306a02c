"""The page's frame-ID stamp (stream/web/app.js) against stream/stamp.py, in headless Chromium: one layout, both ways."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream import stamp

WEB = Path(__file__).resolve().parent.parent / "stream" / "web"
ORIGIN = "http://stream.test"  # every request is answered by `_serve_web`, nothing goes to the network

# Stamps the IDs into a gray canvas of (w, h) px, one at a time; returns each canvas's RGBA bytes.
JS_STAMPED_PIXELS = """([ids, w, h]) => ids.map(id => {
    const c = document.createElement('canvas');
    c.width = w; c.height = h;
    const g = c.getContext('2d');
    g.fillStyle = '#808080';
    g.fillRect(0, 0, w, h);
    window.streamApp.stamp.draw(g, id);
    return Array.from(g.getImageData(0, 0, w, h).data);
})"""

# Puts RGBA bytes of (w, h) px into a canvas and reads the stamp from the canvas's pixels.
JS_READ_PIXELS = """([rgba, w, h]) => {
    const c = document.createElement('canvas');
    c.width = w; c.height = h;
    const g = c.getContext('2d');
    g.putImageData(new ImageData(new Uint8ClampedArray(rgba), w, h), 0, 0);
    return window.streamApp.stamp.read(g.getImageData(0, 0, w, h));
}"""


@pytest.fixture(scope="module")
def page(chromium: str) -> Iterator[Any]:
    """The real page (stream/web/index.html with stream/web/app.js), loaded once for the whole file; no server behind it."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.route(f"{ORIGIN}/**", _serve_web)
        try:
            page.goto(f"{ORIGIN}/")
            page.wait_for_function("window.streamApp && window.streamApp.stamp")
            yield page
            assert not errors, errors
        finally:
            browser.close()


def _serve_web(route: Any) -> None:
    path = route.request.url.removeprefix(ORIGIN).split("?")[0]
    file = WEB / "index.html" if path == "/" else WEB / path.removeprefix("/static/")
    if (path == "/" or path.startswith("/static/")) and file.is_file() and file.parent == WEB:
        route.fulfill(path=str(file))
        return
    route.fulfill(status=404, content_type="application/json", body='{"error": "not found"}')


def _rgb(rgba: list[int], w: int, h: int) -> np.ndarray:
    return np.asarray(rgba, dtype=np.uint8).reshape(h, w, 4)[:, :, :3].copy()


def _rgba(frame: np.ndarray) -> list[int]:
    h, w, _ = frame.shape
    alpha = np.full((h, w, 1), 255, dtype=np.uint8)
    return np.concatenate([frame, alpha], axis=2).ravel().tolist()


def test_js_stamp_reads_in_python(page: Any) -> None:
    ids, w, h = [1, 2, 77, 4095], 80, 72
    pixels = page.evaluate(JS_STAMPED_PIXELS, [ids, w, h])
    assert [stamp.read(_rgb(rgba, w, h)) for rgba in pixels] == ids
    # Exactly Python's pattern: the JS patch equals stream.stamp.stamp's, pixel for pixel.
    for frame_id, rgba in zip(ids, pixels, strict=True):
        expected = stamp.stamp(np.zeros((stamp.PATCH, stamp.PATCH, 3), np.uint8), frame_id)
        np.testing.assert_array_equal(_rgb(rgba, w, h)[: stamp.PATCH, : stamp.PATCH], expected)


def test_python_stamp_reads_in_js(page: Any) -> None:
    rng = np.random.default_rng(0)
    h, w = 72, 96
    for frame_id in [0, 1, 1234, 4095, 4096 + 5]:
        frame = stamp.stamp(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), frame_id)
        assert page.evaluate(JS_READ_PIXELS, [_rgba(frame), w, h]) == frame_id % stamp.ID_MODULO


def test_blank_patches_read_as_no_stamp(page: Any) -> None:
    for value in (0, 255):
        frame = np.full((stamp.PATCH, stamp.PATCH, 3), value, dtype=np.uint8)
        assert stamp.read(frame) is None
        assert page.evaluate(JS_READ_PIXELS, [_rgba(frame), stamp.PATCH, stamp.PATCH]) is None


def test_latency_stats_are_numpy_percentiles(page: Any) -> None:
    samples = np.random.default_rng(1).uniform(20, 200, 300)
    stats = page.evaluate(
        """ms => {
            const app = window.streamApp;
            app.latency.length = 0;
            ms.forEach((m, i) => app.latency.push({id: i + 1, ms: m, t: i}));
            const out = app.latencyStats();
            app.latency.length = 0;
            return [out, app.latencyStats()];
        }""",
        samples.tolist(),
    )
    window = samples[-240:]  # the newest 240 samples
    assert stats[0]["count"] == 240
    for q in (50, 95, 99):
        assert stats[0][f"p{q}"] == pytest.approx(np.percentile(window, q))
    assert stats[1] == {"count": 0, "p50": None, "p95": None, "p99": None}


def test_overlay_shows_budget_and_adaptive(page: Any) -> None:
    budget = {"target_fps": 24, "budget_ms": 41.67, "p95_ms": 38.2, "holds": True}
    change = {
        "at": 12.3,
        "from": {"steps": 4, "width": 256, "height": 256},
        "to": {"steps": 3, "width": 256, "height": 256},
        "reason": "p95 52.1 ms over the 41.7 ms budget",
    }
    adaptive = {
        "enabled": True,
        "level": 1,
        "levels": 6,
        "steps": 3,
        "width": 256,
        "height": 256,
        "changes": [change],
    }
    latency = {
        s: {"p50": 1.5, "p95": 2.5, "p99": 3.0} for s in ["total", "denoise", "unet_1", "unet_2", "handoff"]
    }
    render = "t => window.streamApp.renderTelemetry(t)"
    text = "id => document.getElementById(id).hidden ? null : document.getElementById(id).innerText"
    page.evaluate(
        render,
        {"type": "telemetry", "fps_in": 24, "budget": budget, "adaptive": adaptive, "latency_ms": latency},
    )
    assert page.evaluate(text, "budget") == "budget 41.7 ms: holds"
    assert page.evaluate("() => document.getElementById('budget').className") == "line holds"
    shown = page.evaluate(text, "adaptive")
    assert "3 steps" in shown and "256x256" in shown and "p95 52.1 ms over the 41.7 ms budget" in shown
    rows = page.evaluate(
        "() => [...document.querySelectorAll('#stats-detail table.detail tr')].map(r => r.cells[0].innerText)"
    )
    assert rows.index("denoise") < rows.index("unet_1") < rows.index("unet_2") < rows.index("handoff")

    page.evaluate(
        render, {"type": "telemetry", "budget": {**budget, "holds": False}, "adaptive": {"enabled": False}}
    )
    assert page.evaluate(text, "budget") == "budget 41.7 ms: over"
    assert page.evaluate(text, "adaptive") == "adaptive off"
    assert "unet_1" not in page.evaluate(
        "() => document.querySelector('#stats-detail table.detail').innerText"
    )

    page.evaluate(render, {"type": "telemetry", "fps_in": 24})  # an older server: no budget, no adaptive
    assert page.evaluate(text, "budget") is None and page.evaluate(text, "adaptive") is None
    assert page.evaluate(text, "g2g") is None  # not measuring
