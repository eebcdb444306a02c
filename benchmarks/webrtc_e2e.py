"""Glass-to-glass latency through a real browser: headless Chromium -> `stream serve` -> back, on loopback.

Chromium's fake camera plays a clip panning across a real photo. The page (with "Measure glass-to-glass
latency" on) stamps a frame ID into each camera frame it sends, the server copies that patch into the
processed frame, and the page reads it back from the video it receives: each frame's latency is
measured on the page's one clock, from the camera frame's capture (its captureTime when Chromium
gives one, else when the page draws it) to the processed frame's expected display time. Also: FPS
received (frames decoded) and shown, freezes (gaps over 100 ms between shown frames, and Chromium's
own freeze count), frames dropped by the server (replaced in its input slot) and stamped frames never
seen back. The server runs with adaptive control off (`--adaptive on` to measure with it), so the
figures are for the settings asked for. Prints a table, then one JSON object as the last line.

    python -m benchmarks.webrtc_e2e --model tiny --size 256 --seconds 20
    python -m benchmarks.webrtc_e2e --model tiny --size 256 --seconds 20 --plot e2e.png

Headless Chromium runs on the same machine and encodes and decodes VP8 both ways, so on a small
machine it competes with the model for the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.chromium import CHROMIUM, INBOUND_VIDEO_JS, wait_connected, wait_frames_decoded
from benchmarks.chromium import launch as chromium_launch
from stream.bench import environment, import_pyplot
from stream.clips import photo_clip
from stream.config import ConfigError, StreamConfig
from stream.media import write_y4m
from stream.models import PLACEHOLDER_NOTE, load_model
from stream.monitor import percentile
from stream.server import ServerThread, StreamServer

FREEZE_MS = 100.0


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's model settings, shared with benchmarks.obs_e2e."""
    parser.add_argument("--model", default="tiny", help="any model `stream serve` takes (default: tiny)")
    parser.add_argument("--size", type=int, default=256, help="sent frame and model width = height, px")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per frame")
    parser.add_argument("--guidance", type=float, default=2.0, help="CFG scale; > 1 runs CFG (batched)")
    parser.add_argument("--strength", type=float, default=0.6, help="img2img strength")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")


def stream_config(args: argparse.Namespace) -> StreamConfig:
    """The server's settings from `add_stream_arguments`; ConfigError when one is wrong."""
    if args.size < 64 or args.size % 2:
        raise ConfigError(
            f"--size must be an even number of at least 64 px (the stamp is 64 px), got {args.size}"
        )
    return StreamConfig(
        model=args.model,
        width=args.size,
        height=args.size,
        steps=args.steps,
        guidance_scale=args.guidance,
        strength=args.strength,
        device=args.device,
        prompt="an oil painting",
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.webrtc_e2e",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_stream_arguments(parser)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time, after the warm-up")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds streamed before measuring")
    parser.add_argument("--target-fps", type=float, default=24.0, help="the server's budget")
    parser.add_argument(
        "--adaptive", choices=["on", "off"], default="off", help="the server's adaptive control (default off)"
    )
    parser.add_argument("--chromium", default=CHROMIUM, help="the Chromium binary")
    parser.add_argument("--plot", metavar="FILE.png", help="draw latency over time and its distribution")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # 1. check inputs
    try:
        config = stream_config(args)
        if not (args.seconds > 0 and args.warmup >= 0):
            raise ConfigError(f"--seconds must be > 0 and --warmup >= 0, got {args.seconds}, {args.warmup}")
        if not Path(args.chromium).exists():
            raise ConfigError(f"Chromium not found at {args.chromium}: apt-get install chromium")
        if args.plot:
            import_pyplot()
    except (ConfigError, ValueError) as exc:
        print(f"webrtc_e2e: error: {exc}", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    # 2. the server, the browser, a clip of a real photo as the camera
    components = load_model(config)
    server = StreamServer.for_components(
        config, components, target_fps=args.target_fps, adaptive=args.adaptive == "on"
    )
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "camera.y4m"
        write_y4m(clip, photo_clip("pan", 96, (args.size, args.size), step=2))
        with ServerThread(server) as running, sync_playwright() as p:
            browser = chromium_launch(p, clip, args.chromium)
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"http://127.0.0.1:{running.port}/")
            page.check("#latency-stamp")
            page.click("#start")
            wait_connected(page)
            wait_frames_decoded(page, 0, timeout_s=60)
            # 3. warm up, then measure: everything the page records from now until the end
            page.wait_for_timeout(args.warmup * 1000)
            mark = page.evaluate("({t: performance.now(), sent: window.streamApp.stampsSent})")
            session = next(iter(server.sessions.values()))
            drops0, inbound0 = session.inputs.drops, page.evaluate(INBOUND_VIDEO_JS)
            t0 = time.perf_counter()
            page.wait_for_timeout(args.seconds * 1000)
            data = page.evaluate(
                """(since) => ({
                    latency: window.streamApp.latency.filter(s => s.t >= since),
                    received: window.streamApp.received.filter(t => t >= since),
                    sent: window.streamApp.stampsSent,
                    now: performance.now(),
                })""",
                mark["t"],
            )
            elapsed = time.perf_counter() - t0
            inbound1 = page.evaluate(INBOUND_VIDEO_JS)
            drops = session.inputs.drops - drops0
            snapshot = session.snapshot()
            received_size = page.evaluate(
                "[0, 1].map(i => ['videoWidth', 'videoHeight'][i])"
                ".map(k => document.getElementById('output')[k])"
            )
            browser.close()
    if errors:
        print(f"webrtc_e2e: error: the page raised: {errors[0]}", file=sys.stderr)
        return 1
    # 4. report
    latencies = [s["ms"] for s in data["latency"]]
    times = data["received"]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    freezes = [g for g in gaps if g > FREEZE_MS]
    sent = data["sent"] - mark["sent"]
    result: dict[str, Any] = {
        "benchmark": "webrtc_e2e",
        "model": components.name,
        "placeholder": components.placeholder,
        "size": args.size,
        "received_size": received_size,
        "steps": args.steps,
        "guidance": args.guidance,
        "strength": args.strength,
        "seconds": round(elapsed, 2),
        "glass_to_glass_ms": {
            "p50": _round(percentile(latencies, 50)),
            "p95": _round(percentile(latencies, 95)),
            "p99": _round(percentile(latencies, 99)),
            "count": len(latencies),
        },
        "received_fps": round((inbound1["framesDecoded"] - inbound0["framesDecoded"]) / elapsed, 2),
        "shown_fps": round(len(times) / elapsed, 2),
        "chromium_freezes": inbound1["freezeCount"] - inbound0["freezeCount"],
        "chromium_freeze_ms": round(
            (inbound1["totalFreezesDuration"] - inbound0["totalFreezesDuration"]) * 1000.0, 1
        ),
        "stamped_sent": sent,
        "stamped_back": len(latencies),
        "never_back": max(0, sent - len(latencies)),
        "freezes": len(freezes),
        "freeze_ms_total": round(sum(freezes), 1),
        "longest_gap_ms": round(max(gaps), 1) if gaps else None,
        "server_drops": drops,
        "server_fps_in": snapshot["fps_in"],
        "server_fps_out": snapshot["fps_out"],
        "server_latency_ms": snapshot["latency_ms"],
        **environment(components.unet.device),
        "command": " ".join(["python -m benchmarks.webrtc_e2e", *(sys.argv[1:] if argv is None else argv)]),
    }
    print_table(result)
    if args.plot:
        plot(data, result, args.plot)
        print(f"plot written to {args.plot}")
    print(json.dumps(result))
    return 0


def _round(value: float) -> float | None:
    return None if value != value else round(value, 1)


def print_table(r: dict[str, Any]) -> None:
    print(
        f"{r['model']}, {r['size']}x{r['size']}, {r['steps']} steps, guidance {r['guidance']}: "
        f"Chromium -> stream serve -> Chromium on 127.0.0.1 for {r['seconds']} s"
    )
    if r["placeholder"]:
        print(f"note: {PLACEHOLDER_NOTE}; only the timings mean something")
    g = r["glass_to_glass_ms"]
    print(f"{'':<26}{'p50':>9}{'p95':>9}{'p99':>9}")
    cells = "".join(f"{'-' if g[q] is None else format(g[q], '.1f'):>9}" for q in ("p50", "p95", "p99"))
    print(f"{'glass-to-glass ms':<26}{cells}")
    for stage in ("total", "wait", "handoff"):
        v = r["server_latency_ms"].get(stage)
        if v and v["p50"] is not None:
            print(f"{'server ' + stage + ' ms':<26}{v['p50']:>9.1f}{v['p95']:>9.1f}{v['p99']:>9.1f}")
    print(
        f"received (decoded) {r['received_fps']} fps, shown {r['shown_fps']} fps "
        f"({r['received_size'][0]}x{r['received_size'][1]}); gaps over {FREEZE_MS:.0f} ms between shown "
        f"frames: {r['freezes']} ({r['freeze_ms_total']} ms, longest {r['longest_gap_ms']} ms); Chromium's "
        f"freezes: {r['chromium_freezes']} ({r['chromium_freeze_ms']} ms); server drops {r['server_drops']}; "
        f"stamped frames sent {r['stamped_sent']}, seen back {r['stamped_back']}"
    )


def plot(data: dict[str, Any], result: dict[str, Any], path: str) -> None:
    plt = import_pyplot()
    samples = data["latency"]
    t0 = samples[0]["t"] if samples else 0.0
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    left.plot([(s["t"] - t0) / 1000 for s in samples], [s["ms"] for s in samples], ".", markersize=3)
    left.set(xlabel="s", ylabel="ms", title="glass-to-glass latency per frame")
    right.hist([s["ms"] for s in samples], bins=40, color="tab:blue", alpha=0.8)
    for q, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
        value = result["glass_to_glass_ms"][q]
        if value is not None:
            right.axvline(value, color="black", linestyle=style, label=q)
    right.set(xlabel="ms", ylabel="frames", title="distribution")
    right.legend(fontsize=7)
    times = data["received"]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    middle.plot([(t - times[0]) / 1000 for t in times[1:]], gaps, linewidth=0.8)
    middle.axhline(FREEZE_MS, color="red", linestyle="--", linewidth=1, label="freeze")
    middle.set(xlabel="s", ylabel="ms", title="interval between received frames")
    middle.legend(fontsize=7)
    fig.suptitle(
        f"{result['model']} {result['size']}x{result['size']} {result['steps']} steps, browser round trip"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
