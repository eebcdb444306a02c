"""The page as a newcomer uses it, in headless Chromium against a real server: the layout at phone,
tablet and desktop sizes, the stats, snapshot and recording, the size picker and prompt presets, and
the words of its errors. Screenshots are kept in artifacts/ (or $STREAM_ARTIFACTS)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from benchmarks.chromium import launch as chromium_launch
from benchmarks.chromium import wait_connected, wait_frames_decoded
from stream.config import StreamConfig
from stream.media import write_y4m
from stream.models import load_model
from stream.server import ServerThread, StreamServer
from stream.server.limits import address_full
from tests.conftest import pan_clip

ARTIFACTS = Path(os.environ.get("STREAM_ARTIFACTS", Path(__file__).resolve().parent.parent / "artifacts"))
CAMERA = (256, 192)  # (w, h) of the fake camera clip
CONFIG = StreamConfig(
    model="tiny", width=128, height=128, steps=2, strength=0.6, device="cpu", prompt="a watercolor painting"
)
VIEWPORTS = [(390, 844), (768, 1024), (1280, 800)]

# Every visible element whose content is wider than its box, or that reaches past the window's right edge.
OVERFLOWS_JS = """() => {
    const bad = [];
    const width = document.documentElement.clientWidth;
    for (const el of document.querySelectorAll('body *')) {
        const style = getComputedStyle(el);
        const box = el.getBoundingClientRect();
        if (!box.width || !box.height || style.visibility === 'hidden') continue;
        const name = el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') + (el.className && typeof el.className === 'string' ? '.' + el.className.split(' ')[0] : '');
        if (box.right > width + 1 || box.left < -1) bad.push(`${name} reaches past the window: ${box.left}..${box.right} of ${width}`);
        const scrolls = ['auto', 'scroll'].includes(style.overflowX);
        if (!['select', 'textarea', 'input', 'video', 'option'].includes(el.tagName.toLowerCase()) && !scrolls
            && el.clientWidth && el.scrollWidth > el.clientWidth + 1) bad.push(`${name} overflows: ${el.scrollWidth} > ${el.clientWidth}`);
        if (scrolls && el.scrollWidth > el.clientWidth + 1) bad.push(`${name} scrolls sideways`);
    }
    if (document.documentElement.scrollWidth > width) bad.push('the page scrolls sideways');
    return bad;
}"""
RECT_JS = "sel => { const r = document.querySelector(sel).getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; }"
# The displayed rectangle of the output video's picture (object-fit: contain), and its scale from video px.
PICTURE_JS = """() => {
    const v = document.getElementById('output');
    const r = v.getBoundingClientRect();
    const scale = Math.min(r.width / v.videoWidth, r.height / v.videoHeight);
    const w = v.videoWidth * scale, h = v.videoHeight * scale;
    return [r.left + (r.width - w) / 2, r.top + (r.height - h) / 2, w, h, scale];
}"""


@pytest.fixture(scope="module")
def camera_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    clip = tmp_path_factory.mktemp("page") / "camera.y4m"
    write_y4m(clip, pan_clip(48, (CAMERA[1], CAMERA[0]), step=4))
    return clip


@pytest.fixture(scope="module")
def components(tiny_model_dir: Path) -> Any:
    return load_model(CONFIG)


@pytest.fixture(scope="module")
def server(components: Any) -> Iterator[tuple[StreamServer, str]]:
    stream_server = StreamServer.for_components(CONFIG, components, max_sessions=1)
    with ServerThread(stream_server) as running:
        yield stream_server, f"http://127.0.0.1:{running.port}"


@pytest.fixture(scope="module")
def browser(chromium: str, camera_clip: Path) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = chromium_launch(p, camera_clip, chromium)
        try:
            yield browser
        finally:
            browser.close()


class Page:
    """A page of the app at a viewport size; collects page errors; closing it ends its session."""

    def __init__(self, browser: Any, url: str, size: tuple[int, int] = (1280, 800)) -> None:
        self.context = browser.new_context(
            viewport={"width": size[0], "height": size[1]}, accept_downloads=True
        )
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(url)
        self.page.wait_for_function(
            "document.getElementById('server-info').innerText !== 'contacting the server…'"
        )

    def start(self, stamp: bool = False) -> None:
        if stamp:
            self.page.check("#latency-stamp")
        self.page.click("#start")
        wait_connected(self.page)
        wait_frames_decoded(self.page, 5)
        self.page.wait_for_function(
            "document.getElementById('output').parentElement.classList.contains('live')"
        )

    def status(self) -> tuple[str, str]:
        return self.page.inner_text("#status"), self.page.get_attribute("#status", "data-kind") or ""

    def close(self, server: StreamServer | None = None) -> None:
        self.context.close()
        deadline = time.monotonic() + 20
        while server is not None and server.sessions:
            assert time.monotonic() < deadline, "the page's session was not closed"
            time.sleep(0.1)
        assert not self.errors, self.errors


def wait_for(predicate: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def overlap(a: list[float], b: list[float]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


@pytest.mark.parametrize("size", VIEWPORTS, ids=[f"{w}x{h}" for w, h in VIEWPORTS])
def test_layout_fits_phone_tablet_and_desktop(
    browser: Any, server: tuple[StreamServer, str], size: tuple[int, int]
) -> None:
    stream_server, url = server
    app = Page(browser, url, size)
    page = app.page
    try:
        app.start()
        page.wait_for_function(
            "/\\d+\\.\\d/.test(document.getElementById('stat-fps').innerText)", timeout=20_000
        )
        page.wait_for_timeout(500)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"page-{size[0]}x{size[1]}.png"))
        page.screenshot(path=str(ARTIFACTS / f"page-{size[0]}x{size[1]}-full.png"), full_page=True)
        width = size[0]
        column = page.evaluate(RECT_JS, ".videos")[2]
        inputs, outputs = page.evaluate(RECT_JS, "#input"), page.evaluate(RECT_JS, "#output")
        side_by_side = abs(inputs[1] - outputs[1]) < 1
        for rect in (inputs, outputs):
            share = rect[2] / (column / 2 - 8 if side_by_side else column)
            assert share >= 0.9, (size, rect, column)  # each video fills its column
            assert rect[2] >= (0.9 if width < 700 else 0.45 if width < 1100 else 0.3) * width, (size, rect)
        assert side_by_side == (width >= 700), size  # one video above the other on a phone
        assert outputs[1] < size[1], "the restyled video is not on the first screen"
        if side_by_side:
            assert inputs[1] + inputs[3] <= size[1], "the camera video does not fit on the first screen"
        stop = page.evaluate(RECT_JS, "#stop")
        assert stop[1] >= 0 and stop[1] + stop[3] <= size[1], f"Stop is out of reach at {size}: {stop}"
        status = page.evaluate(RECT_JS, "#status")
        assert status[2] >= 0.9 * column, (size, status)  # not one letter per line
        if width < 1100:  # one column: the videos above the controls
            assert page.evaluate(RECT_JS, "#controls")[1] > max(
                inputs[1] + inputs[3], outputs[1] + outputs[3]
            )
        assert page.evaluate(OVERFLOWS_JS) == []
        # The controls collapse, and the videos take the room.
        page.click("#controls-toggle")
        assert not page.is_visible("#controls") and page.inner_text("#controls-toggle") == "Show controls"
        assert page.evaluate(OVERFLOWS_JS) == []
        assert page.evaluate(RECT_JS, "#output")[2] >= outputs[2] - 1
    finally:
        app.close(stream_server)


def test_stats_start_compact_off_the_stamp_with_live_stages_only(
    browser: Any, server: tuple[StreamServer, str]
) -> None:
    stream_server, url = server
    app = Page(browser, url, (1280, 800))
    page = app.page
    try:
        app.start(stamp=True)  # the frame-ID stamp is drawn in the top-left corner
        page.wait_for_function(
            "/g2g \\d+\\/\\d+ ms/.test(document.getElementById('stat-latency').innerText)", timeout=30_000
        )
        page.wait_for_function("/budget (holds|over)/.test(document.getElementById('stat-budget').innerText)")
        text = page.inner_text("#stats")
        assert "fps" in text and "g2g" in text and "budget" in text and "details" in text, text
        assert not page.is_visible("#stats-detail")  # compact until asked
        stats, frame = page.evaluate(RECT_JS, "#stats"), page.evaluate(RECT_JS, "#output")
        x, y, w, h, scale = page.evaluate(PICTURE_JS)
        stamp = [x, y, 64 * scale, 64 * scale]
        assert not overlap(stats, stamp), (stats, stamp)
        assert stats[3] <= min(32, 0.15 * frame[3]), (stats, frame)  # one line, not a table over the picture
        # Expanded: a panel under the videos, whole, covering nothing.
        page.click("#stats-more")
        assert (
            page.is_visible("#stats-detail") and page.get_attribute("#stats-more", "aria-expanded") == "true"
        )
        detail = page.evaluate(RECT_JS, "#stats-detail")
        assert detail[1] >= frame[1] + frame[3] and not overlap(detail, frame)
        page.wait_for_function(
            "document.querySelector('#stats-detail table.detail').innerText.includes('unet_2')"
        )
        page.screenshot(path=str(ARTIFACTS / "page-stats-detail.png"))
        # One step: the unet_2 row leaves with the first telemetry after the change.
        page.fill("#steps", "1")
        page.dispatch_event("#steps", "input")
        wait_for(
            lambda: next(iter(stream_server.sessions.values())).config.steps == 1, "steps 1 on the server"
        )
        page.wait_for_function(
            "!document.querySelector('#stats-detail table.detail').innerText.includes('unet_2')",
            timeout=10_000,
        )
        rows = page.evaluate(
            "[...document.querySelectorAll('#stats-detail table.detail tr')].map(r => r.cells[0].innerText)"
        )
        assert "unet_1" in rows and not [r for r in rows if r.startswith("unet_") and r != "unet_1"], rows
    finally:
        app.close(stream_server)


def test_snapshot_and_recording_download_real_files(
    browser: Any, server: tuple[StreamServer, str], tmp_path: Path
) -> None:
    stream_server, url = server
    app = Page(browser, url, (1280, 800))
    page = app.page
    try:
        app.start()
        output = page.evaluate(
            "[document.getElementById('output').videoWidth, document.getElementById('output').videoHeight]"
        )
        with page.expect_download() as snap:
            page.click("#snapshot")
        png = tmp_path / snap.value.suggested_filename
        snap.value.save_as(png)
        assert png.suffix == ".png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with av.open(str(png)) as container:
            picture = next(container.decode(video=0)).to_ndarray(format="rgb24")
        assert [picture.shape[1], picture.shape[0]] == output and picture.std() > 5  # a frame, not a blank

        camera = page.evaluate(
            "[document.getElementById('input').videoWidth, document.getElementById('input').videoHeight]"
        )
        beside = round(camera[0] * output[1] / camera[1])  # the camera at the output's height
        for with_camera, width in ((False, output[0]), (True, output[0] + beside)):
            page.set_checked("#record-camera", with_camera)
            page.click("#record")
            assert page.get_attribute("#record", "aria-pressed") == "true"
            page.wait_for_timeout(2500)
            page.click("#record")  # "Stop recording"
            page.wait_for_selector("#download:not([hidden])")
            assert "Download recording" in page.inner_text("#download")
            with page.expect_download() as rec:
                page.click("#download")
            video = tmp_path / rec.value.suggested_filename
            rec.value.save_as(video)
            assert video.suffix == ".webm" and video.read_bytes()[:4] == b"\x1a\x45\xdf\xa3"  # WebM (EBML)
            with av.open(str(video)) as container:
                frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            assert len(frames) >= 5, len(frames)
            assert abs(frames[-1].shape[1] - width) <= 2 and abs(frames[-1].shape[0] - output[1]) <= 2
            assert np.std(frames[-1]) > 5
            (ARTIFACTS / f"recording{'-with-camera' if with_camera else ''}.webm").write_bytes(
                video.read_bytes()
            )
    finally:
        app.close(stream_server)


def test_size_picker_and_prompt_presets_apply_live(browser: Any, server: tuple[StreamServer, str]) -> None:
    stream_server, url = server
    app = Page(browser, url, (1280, 800))
    page = app.page
    try:
        offered = [f"{w} x {h}" for w, h in stream_server.sizes]
        assert offered == ["128 x 128", "192 x 192", "256 x 256"]  # the tiny model's multiples of 16
        assert page.evaluate("[...document.getElementById('size').options].map(o => o.text)") == offered
        assert page.input_value("#size") == "128x128"
        app.start()
        session = next(iter(stream_server.sessions.values()))
        page.select_option("#size", "192x192")
        wait_for(
            lambda: session.applied is not None and session.applied.width == 192, "192x192 in the engine"
        )
        assert (session.config.width, session.config.height) == (192, 192)
        page.wait_for_function("document.getElementById('status').innerText === 'Applied: size 192x192'")
        page.wait_for_function(
            "document.getElementById('adaptive').innerText.includes('192x192')", timeout=10_000
        )
        count = session.monitor.out.count
        wait_for(lambda: session.monitor.out.count > count + 3, "frames at the new size")
        # A preset fills the prompt box and reaches the server.
        page.click("#presets button:has-text('Cyberpunk')")
        prompt = page.input_value("#prompt")
        assert prompt.startswith("cyberpunk") and "neon" in prompt
        wait_for(lambda: session.config.prompt == prompt, "the preset's prompt on the server")
        assert page.locator("#presets button").count() >= 4
    finally:
        app.close(stream_server)


def test_following_the_motion_settings_apply_live(browser: Any, server: tuple[StreamServer, str]) -> None:
    stream_server, url = server
    app = Page(browser, url, (390, 844))
    page = app.page
    try:
        assert page.is_checked("#feedback-warp")  # the server's settings, shown before Start
        assert (page.input_value("#feedback-at"), page.input_value("#noise")) == ("input", "fixed")
        app.start()
        session = next(iter(stream_server.sessions.values()))
        page.select_option("#noise", "warped")
        page.select_option("#feedback-at", "steps")
        page.uncheck("#feedback-warp")
        page.evaluate(
            "const s = document.getElementById('motion-strength');"
            "s.value = '0.4'; s.dispatchEvent(new Event('input', {bubbles: true}));"
            "const i = document.getElementById('image-feedback');"
            "i.value = '0.3'; i.dispatchEvent(new Event('input', {bubbles: true}));"
        )
        wait_for(
            lambda: (
                session.applied is not None
                and (session.applied.noise, session.applied.feedback_at) == ("warped", "steps")
                and session.applied.feedback_warp is False
                and session.applied.motion_strength == 0.4
                and session.applied.image_feedback == 0.3
            ),
            "the motion settings in the engine",
        )
        assert page.inner_text("#motion-strength-value") == "0.40"
        assert page.inner_text("#image-feedback-value") == "0.30"
        count = session.monitor.out.count
        wait_for(lambda: session.monitor.out.count > count + 3, "frames with the new settings")
    finally:
        app.close(stream_server)


def test_errors_say_what_happened_and_what_to_do(
    browser: Any, server: tuple[StreamServer, str], components: Any
) -> None:
    stream_server, url = server
    # The server cannot be reached.
    app = Page(browser, url)
    app.page.route("**/offer", lambda route: route.abort())
    app.page.click("#start")
    app.page.wait_for_function("document.getElementById('status').dataset.kind === 'error'", timeout=30_000)
    assert app.status() == (
        "The server cannot be reached: is `stream serve` still running? Start it, then press Start again.",
        "error",
    )
    # A negative seed: refused visibly, the seed in use said, nothing sent.
    app.page.fill("#seed", "-5")
    message, kind = app.status()
    assert kind == "error" and message == (
        'Seed must be a whole number, 0 or more: "-5" was not applied; the stream keeps seed 0.'
    )
    assert app.page.evaluate("document.getElementById('seed').matches(':invalid')")  # shown red
    app.close(stream_server)

    # This address holds as many sessions as it may (--max-per-address): the server's own answer. On a
    # phone the status line is below the fold: the error is brought into view, clear of the action bar.
    crowded = address_full("203.0.113.7", ["203.0.113.7"] * 2, 2)
    app = Page(browser, url, (390, 844))
    app.page.route("**/offer", lambda route: route.fulfill(status=429, json={"error": crowded}))
    app.page.click("#start")
    app.page.wait_for_function("document.getElementById('status').dataset.kind === 'error'", timeout=30_000)
    status_box = app.page.evaluate("document.getElementById('status').getBoundingClientRect().toJSON()")
    actions = app.page.evaluate("document.querySelector('.actions').getBoundingClientRect().toJSON()")
    assert status_box["top"] >= 0 and status_box["bottom"] <= 844, status_box
    assert status_box["top"] >= actions["bottom"] or status_box["bottom"] <= actions["top"], (
        status_box,
        actions,
    )
    assert app.status() == (
        "Your network already holds as many sessions on this server as one address may: close one "
        "(another tab or device), or wait a few seconds for a page you just closed to free its place, "
        "then press Start.",
        "error",
    )
    app.close(stream_server)

    # All places taken (this server allows one session).
    first = Page(browser, url)
    first.start()
    second = Page(browser, url)
    second.page.click("#start")
    second.page.wait_for_function(
        "document.getElementById('status').dataset.kind === 'error'", timeout=30_000
    )
    assert second.status() == ("All 1 places are taken; try again in a moment.", "error")
    second.close()
    first.close(stream_server)

    # A server with a token: without it, and with a wrong one.
    guarded = StreamServer.for_components(CONFIG, components, token="s3cret")
    with ServerThread(guarded) as running:
        base = f"http://127.0.0.1:{running.port}/"
        app = Page(browser, base)
        expected = (
            "This server needs an access token: add ?token=... to the address (or paste it in Controls), "
            "then press Start."
        )
        assert app.status() == (expected, "warn")
        app.page.click("#start")
        assert app.status() == (expected, "warn") and app.page.is_visible("#token")
        app.close()
        app = Page(browser, base + "?token=wrong")
        app.page.click("#start")
        app.page.wait_for_function(
            "document.getElementById('status').dataset.kind === 'error'", timeout=30_000
        )
        assert app.status()[0].startswith("The access token was not accepted: check it")
        app.page.screenshot(path=str(ARTIFACTS / "page-wrong-token.png"))
        app.close(guarded)
