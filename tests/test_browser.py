"""A real browser: headless Chromium with a fake camera fed by a clip of a real photo, against `stream serve`."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from benchmarks.chromium import FRAMES_DECODED_JS, wait_connected, wait_frames_decoded
from benchmarks.chromium import launch as chromium_launch
from stream.config import StreamConfig
from stream.media import write_y4m
from stream.models import load_model
from stream.server import ServerThread, StreamServer
from tests.conftest import pan_clip

ARTIFACTS = Path(os.environ.get("STREAM_ARTIFACTS", Path(__file__).resolve().parent.parent / "artifacts"))
CAMERA = (256, 192)  # (w, h) of the fake camera clip
CONFIG = StreamConfig(
    model="tiny", width=128, height=128, steps=2, strength=0.6, device="cpu", prompt="a watercolor painting"
)


def test_browser_streams_through_the_page(chromium: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    clip = tmp_path / "camera.y4m"
    write_y4m(clip, pan_clip(48, (CAMERA[1], CAMERA[0]), step=4))
    components = load_model(CONFIG)
    server = StreamServer.for_components(CONFIG, components)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with ServerThread(server) as running, sync_playwright() as p:
        browser = chromium_launch(p, clip, chromium)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            page.goto(f"http://127.0.0.1:{running.port}/")
            banner = page.locator("#placeholder-banner")
            assert banner.is_visible() and "random weights" in banner.inner_text()
            page.click("#start")
            wait_connected(page)
            decoded = FRAMES_DECODED_JS
            wait_frames_decoded(page, 5)
            first = page.evaluate(decoded)
            page.wait_for_timeout(2000)
            second = page.evaluate(decoded)
            assert second > first  # frames keep arriving and decoding
            size = "id => [document.getElementById(id).videoWidth, document.getElementById(id).videoHeight]"
            sent, received = page.evaluate(size, "input"), page.evaluate(size, "output")
            assert received == sent and received[0] > 0  # sent back at the camera's size
            difference = page.evaluate("""() => {
                const grab = id => {
                    const v = document.getElementById(id);
                    const c = document.createElement('canvas');
                    c.width = 64; c.height = 48;
                    const g = c.getContext('2d');
                    g.drawImage(v, 0, 0, 64, 48);
                    return g.getImageData(0, 0, 64, 48).data;
                };
                const a = grab('input'), b = grab('output');
                let sum = 0;
                for (let i = 0; i < a.length; i += 4) sum += Math.abs(a[i] - b[i]) + Math.abs(a[i+1] - b[i+1]);
                return sum / (a.length / 2);
            }""")
            assert difference > 10  # the output is the model's, not an echo of the camera
            # Change the prompt through the page: the server's session gets it.
            page.fill("#prompt", "a neon city at night")
            deadline_ok = False
            for _ in range(100):
                sessions = list(server.sessions.values())
                if sessions and sessions[0].config.prompt == "a neon city at night":
                    deadline_ok = True
                    break
                page.wait_for_timeout(100)
            assert deadline_ok, "the prompt typed in the page did not reach the server"
            # The stats overlay shows numbers from the telemetry channel.
            page.wait_for_function(
                "/\\d+\\.\\d/.test(document.getElementById('stats').innerText)", timeout=10_000
            )
            text = page.inner_text("#stats")
            assert re.search(r"\d+\.\d", text), text
            # The budget and the adaptive controller's level are shown too.
            page.wait_for_function("/budget \\d/.test(document.getElementById('budget').innerText)")
            assert re.search(r"adaptive \d steps?, 128x128", page.inner_text("#adaptive"))
            page.wait_for_timeout(500)
            page.screenshot(path=str(ARTIFACTS / "browser.png"))
            assert not errors, errors
        finally:
            browser.close()


def test_webrtc_e2e_benchmark_measures_glass_to_glass(
    chromium: str, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The e2e benchmark in a short run: stamped frames come back through the real browser and server."""
    from benchmarks.webrtc_e2e import main as e2e_main

    plot = tmp_path / "e2e.png"
    args = ["--size", "128", "--steps", "1", "--guidance", "1", "--seconds", "4", "--warmup", "1"]
    assert e2e_main([*args, "--chromium", chromium, "--plot", str(plot)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    g2g = result["glass_to_glass_ms"]
    assert g2g["count"] >= 5, result  # frame IDs survive VP8 both ways and the server's copy
    assert g2g["p50"] > 0 and g2g["p99"] < 10_000
    assert result["received_fps"] > 1 and result["received_size"] == [128, 128]
    assert 0 < result["stamped_back"] <= result["stamped_sent"]
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_view_page_plays_a_sessions_output_over_whep(
    chromium: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """/view (for an OBS Browser Source): output only, played over WHEP, filling the window."""
    from playwright.sync_api import sync_playwright

    clip = tmp_path / "camera.y4m"
    write_y4m(clip, pan_clip(24, (CAMERA[1], CAMERA[0]), step=4))
    server = StreamServer.for_components(CONFIG, load_model(CONFIG))
    with ServerThread(server) as running, sync_playwright() as p:
        browser = chromium_launch(p, clip, chromium)
        errors: list[str] = []
        try:
            sender = browser.new_page()
            sender.goto(f"http://127.0.0.1:{running.port}/")
            sender.click("#start")
            wait_connected(sender)
            wait_frames_decoded(sender, 3)
            session = next(iter(server.sessions))
            key = server.sessions[session].view_key  # the session's own page has it (the /offer answer)
            for query in (f"?session={session}&key={key}", ""):  # by id, and the newest session
                view = browser.new_page(viewport={"width": 640, "height": 360})
                view.on("pageerror", lambda e: errors.append(str(e)))
                view.goto(f"http://127.0.0.1:{running.port}/view{query}")
                view.wait_for_function(
                    "window.streamView && window.streamView.state === 'playing'", timeout=30_000
                )
                deadline = time.monotonic() + 20
                while view.evaluate("window.streamView.framesDecoded()") <= 5:
                    assert time.monotonic() < deadline, "the viewer decoded too few frames"
                    view.wait_for_timeout(100)
                size = view.evaluate(
                    "(() => { const v = document.querySelector('video'); const r = v.getBoundingClientRect();"
                    " return [v.videoWidth, v.videoHeight, r.width, r.height]; })()"
                )
                camera = sender.evaluate(
                    "[document.getElementById('input').videoWidth, document.getElementById('input').videoHeight]"
                )
                assert size == [*camera, 640, 360], size  # the camera's size, filling the page
                assert not view.locator("button, input").count()  # no controls
                assert len(next(iter(server.sessions.values())).viewers) == 1
                view.close()  # pagehide: the page DELETEs its viewer
                deadline = time.monotonic() + 10
                while next(iter(server.sessions.values())).viewers:
                    assert time.monotonic() < deadline, "the viewer was not freed after the page closed"
                    time.sleep(0.1)
            assert not errors, errors
        finally:
            browser.close()
