"""Frames per second a real browser receives from `stream serve`, and the server's latency per stage.

Headless Chromium (Debian's, driven by Playwright) sends a fake camera fed by a clip made from a real
photo to a `stream serve` app on 127.0.0.1, receives the processed video over WebRTC, and counts the
frames it decodes. Prints a table, then one JSON object as the last line.

    python -m benchmarks.browser_fps --model tiny --size 256 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.chromium import CHROMIUM, FRAMES_DECODED_JS, wait_connected
from benchmarks.chromium import launch as chromium_launch
from stream.capture import write_y4m
from stream.config import StreamConfig
from stream.denoiser import STAGES, load_model
from stream.server import ServerThread, StreamServer


def panning_clip(size: int, frames: int = 96) -> list:  # type: ignore[type-arg]
    """A size x size window panning across a real photo (scikit-image's coffee), 2 px a frame."""
    import cv2
    from skimage import data

    photo = data.coffee()  # (400, 600, 3)
    scale = size / 300
    photo = cv2.resize(photo, (round(600 * scale), round(400 * scale)))
    step = max(1, (photo.shape[1] - size) // frames)
    return [photo[:size, i * step : i * step + size].copy() for i in range(frames)]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=256, help="model and camera width = height")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=2.0, help="> 1 runs CFG (batched)")
    parser.add_argument("--strength", type=float, default=0.6)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time after a warm-up")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--chromium", default=CHROMIUM)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    config = StreamConfig(
        model=args.model,
        width=args.size,
        height=args.size,
        steps=args.steps,
        guidance_scale=args.guidance,
        strength=args.strength,
        device=args.device,
        prompt="an oil painting",
    )
    components = load_model(config)
    server = StreamServer.for_components(config, components)
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "camera.y4m"
        write_y4m(clip, panning_clip(args.size))
        with ServerThread(server) as running, sync_playwright() as p:
            browser = chromium_launch(p, clip, args.chromium)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{running.port}/")
            page.click("#start")
            wait_connected(page)
            page.wait_for_timeout(args.warmup * 1000)
            n0, t0 = page.evaluate(FRAMES_DECODED_JS), time.perf_counter()
            page.wait_for_timeout(args.seconds * 1000)
            n1, t1 = page.evaluate(FRAMES_DECODED_JS), time.perf_counter()
            size = page.evaluate(
                "[document.getElementById('output').videoWidth,"
                " document.getElementById('output').videoHeight]"
            )
            session = next(iter(server.sessions.values())).snapshot()
            browser.close()
    browser_fps = (n1 - n0) / (t1 - t0)
    result = {
        "benchmark": "browser_fps",
        "model": components.name,
        "size": args.size,
        "received_size": size,
        "steps": args.steps,
        "guidance": args.guidance,
        "seconds": round(t1 - t0, 2),
        "browser_fps": round(browser_fps, 2),
        "server_fps_in": session["fps_in"],
        "server_fps_out": session["fps_out"],
        "drops": session["drops"],
        "latency_ms": session["latency_ms"],
        "device": str(components.unet.device),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "command": " ".join(["python -m benchmarks.browser_fps", *sys.argv[1:]]),
    }
    print(f"model {components.name}, {args.size}x{args.size}, {args.steps} steps, guidance {args.guidance}")
    print(
        f"browser received {browser_fps:.1f} fps over {t1 - t0:.1f} s (server in {session['fps_in']} / "
        f"out {session['fps_out']} fps, drops {session['drops']})"
    )
    print(f"{'stage':<12} {'p50':>8} {'p95':>8} {'p99':>8}   (ms, server side)")
    for stage in ("total", *STAGES, "wait"):
        v = session["latency_ms"].get(stage)
        if v:
            print(f"{stage:<12} {v['p50']:>8} {v['p95']:>8} {v['p99']:>8}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
