"""Headless Chromium (Debian's, driven by Playwright) with a fake camera fed by a .y4m clip."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"

# Counts the video frames the page's peer connection has decoded (evaluated in the page).
INBOUND_VIDEO_JS = """async () => {
    const stats = await window.streamApp.pc.getStats();
    let found = {framesDecoded: 0, freezeCount: 0, totalFreezesDuration: 0};
    stats.forEach(r => { if (r.type === 'inbound-rtp' && r.kind === 'video') found = r; });
    return {framesDecoded: found.framesDecoded || 0, freezeCount: found.freezeCount || 0,
            totalFreezesDuration: found.totalFreezesDuration || 0};
}"""
FRAMES_DECODED_JS = """async () => {
    const stats = await window.streamApp.pc.getStats();
    let n = 0;
    stats.forEach(r => { if (r.type === 'inbound-rtp' && r.kind === 'video') n = r.framesDecoded; });
    return n;
}"""


def launch(playwright: Any, clip: Path, executable: str = CHROMIUM) -> Any:
    """A headless Chromium whose camera is `clip`, with no network chatter of its own."""
    return playwright.chromium.launch(
        executable_path=executable,
        headless=True,
        args=[
            "--no-sandbox",
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-video-capture={clip}",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-gpu",
        ],
    )


def wait_connected(page: Any, timeout_ms: int = 60_000) -> None:
    page.wait_for_function(
        "window.streamApp.pc && window.streamApp.pc.connectionState === 'connected'", timeout=timeout_ms
    )


def wait_frames_decoded(page: Any, count: int, timeout_s: float = 30.0) -> int:
    """Poll until the page has decoded more than `count` video frames; returns the number decoded.

    (page.wait_for_function cannot wait on a Promise: it takes any Promise as truthy.)
    """
    deadline = time.monotonic() + timeout_s
    while True:
        decoded = int(page.evaluate(FRAMES_DECODED_JS))
        if decoded > count:
            return decoded
        if time.monotonic() > deadline:
            raise TimeoutError(f"the page decoded only {decoded} frames in {timeout_s:.0f} s")
        page.wait_for_timeout(100)
