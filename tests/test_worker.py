"""The scheduler worker: rounds batch the sessions that can share a batch; failures cost one frame of one
session; a worker that stops says so; settings roll back only the version the model refused."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection

from stream.config import StreamConfig
from stream.denoiser import StreamDenoiser
from stream.engine import Engine
from stream.models import Components, load_model
from stream.server import ServerThread, StreamServer
from stream.server.session import Session
from stream.server.worker import MAX_FAILURES, ModelWorker
from tests.conftest import pan_clip

CONFIG = StreamConfig(model="tiny", width=64, height=64, steps=2, strength=0.6, device="cpu", prompt="a cup")
FRAME = pan_clip(1, (64, 64))[0]


@pytest.fixture(scope="module")
def components(tiny_model_dir: Path) -> Components:
    return load_model(CONFIG)


class Channel:
    """A control channel that keeps what the server sends."""

    readyState = "open"

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, text: str) -> None:
        self.sent.append(json.loads(text))


def session(name: str, config: StreamConfig = CONFIG) -> Session:
    s = Session(name, SimpleNamespace(), config, adaptive=False)  # type: ignore[arg-type]
    s.control = Channel()  # type: ignore[assignment]
    return s


def feed(s: Session, pts: int = 0) -> None:
    frame = av.VideoFrame.from_ndarray(FRAME, format="rgb24")
    frame.pts, frame.time_base = pts, Fraction(1, 90000)
    s.inputs.put((frame, time.monotonic()))


async def rounds(worker: ModelWorker, sessions: list[Session], count: int) -> None:
    """`count` rounds, each with a new frame for every session; then let the loop run the callbacks."""
    for i in range(count):
        for s in sessions:
            feed(s, 3000 * i)
        done = worker.rounds
        worker.notify()
        for _ in range(400):
            if worker.rounds > done and not any(s.inputs.ready for s in sessions):
                break
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)


def run_worker(
    factory: Callable[[StreamConfig], Any], sessions: list[Session], count: int, **options: Any
) -> tuple[ModelWorker, list[tuple[str, str]]]:
    failed: list[tuple[str, str]] = []

    async def main() -> ModelWorker:
        worker = ModelWorker(
            factory,
            asyncio.get_running_loop(),
            CONFIG,
            on_failed=lambda s, reason: failed.append((s.id, reason)),
            **options,
        )
        worker.start()
        for s in sessions:
            worker.add(s)
        try:
            await rounds(worker, sessions, count)
        finally:
            await asyncio.to_thread(worker.stop)
        return worker

    return asyncio.run(main()), failed


def frames_out(s: Session) -> int:
    return len(s.monitor.out.stamps)


# ---------------------------------------------------------------------- rounds and batches
@pytest.mark.parametrize("batching", [True, False])
def test_a_round_batches_sessions_of_one_size(components: Components, batching: bool) -> None:
    denoisers: list[StreamDenoiser] = []

    def factory(config: StreamConfig) -> StreamDenoiser:
        denoisers.append(StreamDenoiser(components, config))
        return denoisers[-1]

    small = [session(f"s{i}", CONFIG.replace(prompt=f"prompt {i}", seed=i)) for i in range(3)]
    big = session("big", CONFIG.replace(width=128, height=128))
    engine = Engine.shared(components, CONFIG)
    before = engine.calls
    worker, failed = run_worker(factory, [*small, big], 1, batching=batching)
    assert not failed and worker.failure is None
    assert all(frames_out(s) == 1 for s in [*small, big])
    assert all(d.engine is engine for d in denoisers)
    calls = engine.calls - before
    # 2 steps: 2 UNet calls for the three 64x64 sessions together and 2 for the 128x128 one; 8 one by one
    assert calls == (4 if batching else 8)
    assert small[0].output is not None and small[0].output.frame.shape == FRAME.shape


def test_stream_batch_sessions_share_one_call_a_round_and_keep_their_inputs_pts(
    components: Components,
) -> None:
    sessions = [session(f"sb{i}", CONFIG.replace(stream_batch=True, steps=3, seed=i)) for i in range(2)]
    sent: dict[str, list[int | None]] = {s.id: [] for s in sessions}
    for s in sessions:
        deliver = s.deliver

        def recording(
            processed: Any, timings: Any, skipped: bool, s: Session = s, deliver: Any = deliver
        ) -> None:
            sent[s.id].append(processed.pts)
            deliver(processed, timings, skipped)

        s.deliver = recording  # type: ignore[method-assign]
    engine = Engine.shared(components, CONFIG)
    before = engine.calls
    worker, failed = run_worker(lambda c: StreamDenoiser(components, c), sessions, 5)
    assert not failed and worker.failure is None
    assert engine.calls - before == 5  # one UNet call a round for both sessions' frames in flight
    # nothing for the first 2 rounds; then inputs 0, 1, 2 with their own pts (3000 a frame)
    assert all(sent[s.id] == [0, 3000, 6000] for s in sessions), sent


# ---------------------------------------------------------------------- failures
class Failing:
    """A denoiser that fails every frame, as an out-of-memory error would."""

    skipped = 0

    def process(self, frame: np.ndarray, tag: object = None) -> Any:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def update(self, config: StreamConfig) -> None:
        pass


def test_a_failing_session_loses_its_frames_only_and_is_closed(components: Components) -> None:
    def factory(config: StreamConfig) -> Any:
        return Failing() if config.prompt == "boom" else StreamDenoiser(components, config)

    good, bad = session("good"), session("bad", CONFIG.replace(prompt="boom"))
    worker, failed = run_worker(factory, [good, bad], MAX_FAILURES + 1)
    assert frames_out(good) == MAX_FAILURES + 1 and frames_out(bad) == 0
    errors = [m for m in bad.control.sent if m["type"] == "error"]  # type: ignore[union-attr]
    assert errors and "out of memory" in errors[0]["message"]
    assert failed and failed[0][0] == "bad" and f"{MAX_FAILURES} frames in a row failed" in failed[0][1]
    assert not good.control.sent  # type: ignore[union-attr]


def test_a_session_whose_model_cannot_be_made_fails_alone(components: Components) -> None:
    def factory(config: StreamConfig) -> Any:
        if config.prompt == "boom":
            raise MemoryError("out of memory making a session")
        return StreamDenoiser(components, config)

    good, bad = session("good"), session("bad", CONFIG.replace(prompt="boom"))
    worker, failed = run_worker(factory, [good, bad], 2)
    assert frames_out(good) == 2 and frames_out(bad) == 0
    assert "out of memory making a session" in bad.control.sent[0]["message"]  # type: ignore[union-attr]


def test_a_failing_batch_runs_its_sessions_one_by_one(
    components: Components, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[StreamDenoiser] = []

    def factory(config: StreamConfig) -> StreamDenoiser:
        made.append(StreamDenoiser(components, config))
        return made[-1]

    def batch_fails(*args: Any) -> Any:
        raise RuntimeError("out of memory at this batch size")

    monkeypatch.setattr("stream.server.worker.process_batch", batch_fails)
    sessions = [session(f"s{i}") for i in range(3)]
    worker, failed = run_worker(factory, sessions, 2)
    assert not failed and all(frames_out(s) == 2 for s in sessions)
    assert all(not s.control.sent for s in sessions)  # type: ignore[union-attr]


def test_a_worker_that_stops_is_reported_and_refuses_offers(
    components: Components, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_round(self: ModelWorker) -> None:
        raise RuntimeError("a bug outside any frame")

    monkeypatch.setattr(ModelWorker, "_round", broken_round)
    server = StreamServer.for_components(CONFIG, components)

    async def check(base: str) -> None:
        body: dict[str, Any] = {}
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                async with http.get(f"{base}/health") as r:
                    if r.status == 503:
                        health = await r.json()
                        break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("/health never reported the stopped worker")
            assert health["status"] == "error" and "a bug outside any frame" in health["error"]
            pc = RTCPeerConnection()
            pc.addTransceiver("video", direction="sendrecv")
            await pc.setLocalDescription(await pc.createOffer())
            async with http.post(
                f"{base}/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"}
            ) as r:
                assert r.status == 503
                body = await r.json()
            await pc.close()
            assert "cannot take sessions now" in body["error"] and "a bug outside any frame" in body["error"]

    with ServerThread(server) as thread:
        asyncio.run(check(f"http://127.0.0.1:{thread.port}"))
    assert server.worker is not None and server.unavailable() is not None
    assert "a bug outside any frame" in str(server.unavailable())


# ---------------------------------------------------------------------- settings and timestamps
def test_a_refusal_rolls_back_only_the_version_it_refused() -> None:
    s = session("s")
    good = s.config
    s.config = CONFIG.replace(strength=0.05, steps=5)  # version 1: the model will refuse it
    refused_version = s.requested[1]
    s.config = CONFIG.replace(prompt="newer")  # version 2 arrives before the refusal
    s.refuse("cannot run that", refused_version, good)
    assert s.config.prompt == "newer"  # the newer setting survives
    s.refuse("cannot run that either", s.requested[1], good)
    assert s.config == good  # the refused version itself is rolled back
    assert [m["message"] for m in s.control.sent] == ["cannot run that", "cannot run that either"]  # type: ignore[union-attr]


def test_output_timestamps_never_jump_on_a_missing_pts_or_a_restarted_clock() -> None:
    s = session("s")
    base = Fraction(1, 90000)
    # frames 1500 ticks apart, a missing pts, a clock restarted forward and back, the 32-bit wrap-around
    inputs = [1000, 2500, None, 4000, 2**31, 2**31 + 1500, 5, 1505, 2**32 - 750, 750]
    out = [s.output_pts(pts, base) for pts in inputs]
    steps = [b - a for a, b in zip(out, out[1:], strict=False)]
    # real time where the input has it; one nominal frame (1/30 s = 3000 ticks) where it does not
    assert steps == [1500, 3000, 3000, 3000, 1500, 3000, 1500, 3000, 1500]
