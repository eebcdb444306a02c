"""Soak: sessions that come and go must leave nothing behind, and cost the others little.

Starts `stream serve` as its own process (so that its memory, threads and open files are its own), one
steady session streaming throughout, then N cycles of: a second session connects, streams until it
has received some frames, hangs up. Reports the server's RSS, threads and open file descriptors
before the cycles, right after, and after a settle time; the steady session's frame rate alone and
during the cycles; the time of one cycle (p50/p95/p99). Prints a table, then one JSON object.

    python -m benchmarks.soak --model tiny --size 64 --cycles 100 --settle 20
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import torch
from aiortc import RTCPeerConnection, RTCSessionDescription

from benchmarks.common import (
    ArgumentParser,
    UsageError,
    command_line,
    environment,
    latency_stats,
    usage_error,
)
from benchmarks.peers import ClipTrack, count_frames
from stream.clips import window_pan

TOKEN = "soak-token"
PROGRAM = "benchmarks.soak"


class Session:
    """A page stand-in: sends the clip, counts the processed frames that come back."""

    def __init__(self, frames: list[np.ndarray]) -> None:
        self.pc = RTCPeerConnection()
        self.pc.addTransceiver(ClipTrack(frames), direction="sendrecv")
        self.pc.createDataChannel("control")
        self.pc.createDataChannel("telemetry")
        self.received = 0
        self.reader: asyncio.Task[None] | None = None
        self.pc.on("track", self._on_track)

    def _on_track(self, track: Any) -> None:
        if track.kind == "video":
            self.reader = asyncio.ensure_future(count_frames(track, self._count))

    def _count(self) -> None:
        self.received += 1

    async def connect(self, url: str) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        body = {"sdp": self.pc.localDescription.sdp, "type": "offer"}
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with (
            aiohttp.ClientSession() as http,
            http.post(url + "/offer", json=body, headers=headers) as r,
        ):
            answer = await r.json()
            if r.status != 200:
                raise RuntimeError(f"/offer answered {r.status}: {answer.get('error')}")
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))

    async def wait(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.received < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {self.received} of {count} frames came back in {timeout:.0f} s")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        await self.pc.close()
        if self.reader is not None:
            self.reader.cancel()


def usage(pid: int) -> dict[str, float]:
    """The server process's resident memory (MiB), threads and open file descriptors, from /proc."""
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return {
        "rss_mib": round(int(status["VmRSS"].split()[0]) / 1024, 1),
        "threads": int(status["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


async def steady_rate(session: Session, seconds: float) -> float:
    start, t0 = session.received, time.monotonic()
    await asyncio.sleep(seconds)
    return (session.received - start) / (time.monotonic() - t0)


async def soak(url: str, pid: int, args: Any) -> dict[str, Any]:
    frames = window_pan(30, (120, 160), step=(3, 0))
    steady = Session(frames)
    await steady.connect(url)
    await steady.wait(10)
    await asyncio.sleep(args.warmup)  # warm up: the model, the encoders, the executor threads
    warm = Session(frames)  # one cycle before measuring: threads and pools made once are not leaks
    await warm.connect(url)
    await warm.wait(args.frames)
    await warm.close()
    await asyncio.sleep(2.0)
    before = usage(pid)
    alone = await steady_rate(steady, args.alone)
    cycle_ms: list[float] = []
    window_fps: list[float] = []
    count, t0 = steady.received, time.monotonic()
    for _ in range(args.cycles):
        start, had = time.monotonic(), steady.received
        visitor = Session(frames)
        await visitor.connect(url)
        await visitor.wait(args.frames)
        await visitor.close()
        elapsed = time.monotonic() - start
        cycle_ms.append(elapsed * 1000.0)
        window_fps.append((steady.received - had) / elapsed)
    during = (steady.received - count) / (time.monotonic() - t0)
    after = usage(pid)
    await asyncio.sleep(args.settle)
    settled = usage(pid)
    await steady.close()
    return {
        "before": before,
        "after": after,
        "settled": settled,
        "steady_fps_alone": round(alone, 2),
        "steady_fps_during": round(during, 2),
        "steady_fps_cycle_p5": round(float(np.percentile(window_fps, 5)), 2),
        "cycle": latency_stats(cycle_ms),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse(argv: Sequence[str]) -> Any:
    parser = ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="model for `stream serve` (default: tiny)")
    parser.add_argument("--size", type=int, default=64, help="model size in pixels (default: 64)")
    parser.add_argument(
        "--cycles", type=int, default=100, help="connect/stream/hang-up cycles (default: 100)"
    )
    parser.add_argument(
        "--frames", type=int, default=5, help="frames a visitor receives per cycle (default: 5)"
    )
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up (default: 3)")
    parser.add_argument("--alone", type=float, default=5.0, help="seconds the steady session is timed alone")
    parser.add_argument(
        "--settle", type=float, default=20.0, help="seconds to wait after the cycles (default: 20)"
    )
    args = parser.parse_args(argv)
    if args.cycles < 1 or args.frames < 1 or args.size < 16:
        raise UsageError("--cycles and --frames must be at least 1, --size at least 16")
    if args.settle < 0 or args.warmup < 0 or args.alone <= 0:
        raise UsageError("--settle and --warmup must be >= 0 seconds, --alone > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse(argv)
    except UsageError as exc:
        return usage_error(PROGRAM, str(exc))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="stream-soak-")) / "server.log"
    size = str(args.size)
    serve = ["serve", "--model", args.model, "--width", size, "--height", size, "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stream", *serve, "--token", TOKEN, "--max-sessions", "4"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        deadline = time.monotonic() + 300
        while "stream: serving" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                print(log.read_text(), file=sys.stderr)
                return 1
            time.sleep(0.2)
        result = asyncio.run(soak(url, proc.pid, args))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    rows = [
        ("before", result["before"]),
        ("after", result["after"]),
        (f"+{args.settle:g} s", result["settled"]),
    ]
    print(f"soak: {args.cycles} sessions connected, streamed {args.frames} frames and hung up, one streaming")
    print(f"{'':10} {'RSS MiB':>9} {'threads':>8} {'fds':>5}")
    for name, u in rows:
        print(f"{name:10} {u['rss_mib']:>9.1f} {u['threads']:>8d} {u['fds']:>5d}")
    cycle = result["cycle"]
    print(
        f"cycle (connect to {args.frames} frames back, hang up): p50 {cycle['p50_ms']:.0f} ms, "
        f"p95 {cycle['p95_ms']:.0f} ms, p99 {cycle['p99_ms']:.0f} ms"
    )
    print(
        f"steady session: {result['steady_fps_alone']:.1f} FPS alone, {result['steady_fps_during']:.1f} FPS "
        f"during the cycles (p5 of a cycle: {result['steady_fps_cycle_p5']:.1f})"
    )
    machine = environment(torch.device("cpu"))  # the server's device is its own; this is the machine
    print(json.dumps({"benchmark": "soak", "command": command_line(PROGRAM, argv), **machine, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
