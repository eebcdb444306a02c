"""`stream serve --cluster` on this machine: sessions admitted and aggregate frames/s with 1 and 2 workers,
and the time the front adds to an offer.

A local Ray cluster is started here; for each worker count, the workers load the model, a front runs in
this process, and aiortc clients (each sending a photo at 30 FPS) open sessions through it until it
answers 503. After a warm-up, every client's received frames are counted for `--seconds`. Then
`--offers` offers are timed through the front: each answer carries the worker's own time
(`Server-Timing: worker;dur=...`), so the front's share (placement, Ray's call, relaying) is the rest.
Prints a table, then one JSON object as the last line.

    python -m benchmarks.cluster --model tiny --size 128 --workers 1,2 --max-sessions 4 --seconds 15
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import numpy as np
import ray
import torch
from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription

from benchmarks.common import ArgumentParser, UsageError, command_line, latency_stats, usage_error
from benchmarks.peers import ClipTrack, count_frames
from stream.bench import environment
from stream.clips import window_pan
from stream.cluster.actor import WorkerSettings
from stream.cluster.front import ClusterFront
from stream.cluster.placement import READY
from stream.cluster.pool import WorkerPool
from stream.config import ConfigError, StreamConfig

PROGRAM = "benchmarks.cluster"


class Viewer:
    """A browser stand-in: sends the photo, counts the processed frames that come back."""

    def __init__(self, frame: np.ndarray) -> None:
        self.pc = RTCPeerConnection()
        self.pc.addTransceiver(ClipTrack([frame]), direction="sendrecv")
        self.pc.createDataChannel("control")
        self.received = 0
        self.reader: asyncio.Task[None] | None = None
        self.pc.on(
            "track",
            lambda track: setattr(self, "reader", asyncio.ensure_future(count_frames(track, self._count))),
        )

    def _count(self) -> None:
        self.received += 1

    async def offer(self, http: aiohttp.ClientSession, url: str) -> tuple[int, float, float | None]:
        """(HTTP status, ms to the answer, the worker's ms of it) for this client's offer."""
        await self.pc.setLocalDescription(await self.pc.createOffer())
        body = {"sdp": self.pc.localDescription.sdp, "type": "offer"}
        start = time.perf_counter()
        async with http.post(url + "/offer", json=body) as r:
            answer = await r.json()
            took = (time.perf_counter() - start) * 1000.0
            timing = re.search(r"worker;dur=([\d.]+)", r.headers.get("Server-Timing", ""))
        if r.status == 200:
            await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        return r.status, took, float(timing.group(1)) if timing else None

    async def connected(self, timeout: float = 20.0) -> None:
        """Until the connection is up (a hang-up before that leaves the place taken until it times out)."""
        deadline = time.monotonic() + timeout
        while self.pc.connectionState != "connected" and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        await self.pc.close()
        if self.reader is not None:
            self.reader.cancel()


async def serve(front: ClusterFront) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(front.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


async def measure(
    args: argparse.Namespace, config: StreamConfig, workers: int, frame: np.ndarray
) -> dict[str, Any]:
    """One worker count: start the workers, fill them, count frames, time offers, stop them."""
    settings = WorkerSettings(config, sized=True, max_sessions=args.max_sessions, adaptive=False)
    pool = WorkerPool(settings, workers=workers, gpu=args.device.startswith("cuda"), poll_interval=0.5)
    front = ClusterFront(pool, config, max_sessions=args.max_sessions)
    started = time.perf_counter()
    runner, url = await serve(front)
    viewers: list[Viewer] = []
    try:
        while not (len(pool.views) == workers and all(w.state == READY for w in pool.views.values())):
            await asyncio.sleep(0.2)
        ready_s = time.perf_counter() - started
        async with aiohttp.ClientSession() as http:
            # 1. sessions until the front answers 503
            while True:
                viewer = Viewer(frame)
                status, _, _ = await viewer.offer(http, url)
                if status != 200:
                    await viewer.close()
                    break
                viewers.append(viewer)
            # 2. frames/s of all sessions together, after a warm-up
            await asyncio.sleep(args.warmup)
            before = [v.received for v in viewers]
            await asyncio.sleep(args.seconds)
            counts = [v.received - b for v, b in zip(viewers, before, strict=True)]
            async with http.get(url + "/stats") as r:
                stats = await r.json()
            for viewer in viewers:
                await viewer.close()
            viewers.clear()
            while pool.routes:  # the places are free again
                await asyncio.sleep(0.2)
            # 3. the front's share of an offer's time (each session connects and hangs up before the next)
            total, worker_ms = [], []
            for _ in range(args.offers):
                viewer = Viewer(frame)
                status, took, own = await viewer.offer(http, url)
                if status == 200 and own is not None:
                    total.append(took)
                    worker_ms.append(own)
                    await viewer.connected()
                await viewer.close()
                while pool.routes:
                    await asyncio.sleep(0.05)
        overhead = [t - w for t, w in zip(total, worker_ms, strict=True)]
        return {
            "workers": workers,
            "ready_s": round(ready_s, 1),
            "admitted": len(counts),
            "places": workers * args.max_sessions,
            "fps_total": round(sum(counts) / args.seconds, 2),
            "fps_per_session_p50": round(float(np.median(counts)) / args.seconds, 2) if counts else 0.0,
            "budget_holds": sum(1 for s in stats["sessions"] if s["budget"]["holds"]),
            "offer_ms": {k: round(v, 2) for k, v in latency_stats(total).items()} if total else None,
            "worker_ms": {k: round(v, 2) for k, v in latency_stats(worker_ms).items()} if worker_ms else None,
            "front_overhead_ms": {k: round(v, 2) for k, v in latency_stats(overhead).items()}
            if overhead
            else None,
        }
    finally:
        for viewer in viewers:
            await viewer.close()
        await runner.cleanup()
        for handle in pool.handles.values():
            ray.kill(handle)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog=f"python -m {PROGRAM}", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="any model `stream serve` takes (default: tiny)")
    parser.add_argument("--size", type=int, default=128, help="model width = height, px (default: 128)")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per frame (default: 2)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for one worker per GPU (default: cpu)")
    parser.add_argument("--workers", default="1,2", help="worker counts to compare (default: 1,2)")
    parser.add_argument("--max-sessions", type=int, default=4, help="places per worker (default: 4)")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds (default: 15)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds streamed first (default: 5)")
    parser.add_argument("--offers", type=int, default=30, help="offers timed through the front (default: 30)")
    args = parser.parse_args(argv)
    try:
        args.worker_counts = [int(n) for n in args.workers.split(",")]
    except ValueError:
        raise UsageError(
            f"--workers must be counts separated by commas, e.g. 1,2; got {args.workers!r}"
        ) from None
    if any(n < 1 for n in args.worker_counts) or args.max_sessions < 1 or args.offers < 1:
        raise UsageError("--workers, --max-sessions and --offers must be at least 1")
    if args.seconds <= 0 or args.warmup < 0:
        raise UsageError("--seconds must be > 0 and --warmup >= 0")
    return args


def print_table(result: dict[str, Any]) -> None:
    r = result
    print(f"{r['model']} at {r['size']}x{r['size']}, {r['steps']} steps, on {r['device']}")
    print("workers  ready s  admitted/places  frames/s total  per session p50  holding budget")
    for r in result["runs"]:
        print(
            f"{r['workers']:>7}  {r['ready_s']:>7}  {r['admitted']:>8}/{r['places']:<6}  "
            f"{r['fps_total']:>14}  {r['fps_per_session_p50']:>15}  {r['budget_holds']:>14}"
        )
    print("offer through the front, ms:   p50     p95     (the worker's own share, and the rest)")
    for r in result["runs"]:
        if r["offer_ms"]:
            o, w, f = r["offer_ms"], r["worker_ms"], r["front_overhead_ms"]
            print(
                f"  {r['workers']} worker(s): total {o['p50_ms']:>6} {o['p95_ms']:>7}; "
                f"worker {w['p50_ms']:>6} {w['p95_ms']:>7}; front {f['p50_ms']:>6} {f['p95_ms']:>7}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        config = StreamConfig(
            model=args.model, width=args.size, height=args.size, steps=args.steps, strength=0.6,
            guidance_scale=1.0, device=args.device,
        )  # fmt: skip
    except (UsageError, ConfigError) as exc:
        return usage_error(PROGRAM, str(exc))
    frame = window_pan(1, (240, 320), photo="coffee")[0]  # a 320x240 camera frame
    ray.init(include_dashboard=False, log_to_driver=False, namespace=f"{PROGRAM}-{time.time_ns()}")
    try:
        runs = [asyncio.run(measure(args, config, n, frame)) for n in args.worker_counts]
    finally:
        ray.shutdown()
    result = {
        "benchmark": PROGRAM,
        "model": args.model,
        "size": args.size,
        "steps": args.steps,
        "device": args.device,
        "runs": runs,
        "environment": environment(torch.device(args.device)),
        "command": command_line(PROGRAM, argv),
    }
    print_table(result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
