"""`stream serve --cluster`: a local Ray cluster started here, two CPU workers on the tiny model, the front
in this process, and aiortc clients that connect through the front and get their media from the workers."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
import ray
from aiortc import RTCPeerConnection, RTCSessionDescription

from stream.cli import main
from stream.cluster.actor import WorkerSettings
from stream.cluster.front import ClusterFront
from stream.cluster.placement import READY, STARTING, WorkerView, pick, why_full
from stream.cluster.pool import PREFIX, WorkerPool, call, launch
from stream.config import StreamConfig
from stream.server import ServerThread
from stream.server.limits import Limits
from tests.conftest import pan_clip
from tests.test_serve_startup import free_port
from tests.test_server import PEER, Client, ClipTrack, running, until

pytestmark = pytest.mark.timeout(300)

CONFIG = StreamConfig(
    model="tiny",
    width=64,
    height=64,
    steps=1,
    strength=0.6,
    device="cpu",
    prompt="a watercolor painting",
    guidance_scale=1.0,
)
PORTS = (47100, 47399)  # the workers' UDP range for WebRTC
SETTINGS = WorkerSettings(CONFIG, sized=True, max_sessions=2, rtc_ports=PORTS, adaptive=False)
W1, W2 = f"{PREFIX}1", f"{PREFIX}2"
INPUT = pan_clip(1, (60, 80))[0]


@pytest.fixture(scope="module")
def workers(tiny_model_dir: Any) -> Any:
    """Ray on this machine, once for the module, with two workers up (their model loaded)."""
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        namespace=f"stream-test-{secrets.token_hex(4)}",
    )
    try:
        handles = [launch(name, SETTINGS, gpu=False) for name in (W1, W2)]
        ray.get([h.status.remote() for h in handles], timeout=180)
        yield handles
    finally:
        ray.shutdown()


@asynccontextmanager
async def front_of(
    workers: Any, count: int = 2, peers: bool = False
) -> AsyncIterator[tuple[str, ClusterFront]]:
    """A front (on this test's event loop) over the running workers, once both report ready and empty.
    `count`: the workers it starts itself (the others it finds by name, as workers started elsewhere);
    `peers`: as in tests.test_server.running."""
    pool = WorkerPool(SETTINGS, workers=count, gpu=False, poll_interval=0.2, scale_interval=1.0)
    front = ClusterFront(pool, CONFIG, max_sessions=2)
    async with running(front, peers=peers) as url:
        await until(
            lambda: (
                all(w.state == READY and w.sessions == 0 for w in pool.views.values())
                and len(pool.views) == 2
            ),
            timeout=120,
        )
        yield url, front


async def get(url: str, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(url + path) as r:
        return r.status, (await r.json() if r.content_type == "application/json" else await r.text())


async def worker_of(url: str, session: str) -> str:
    status, body = await get(url, f"/sessions/{session}")
    assert status == 200 and body["state"] == "running", body
    return str(body["worker"])


def candidate_ports(sdp: str) -> list[int]:
    return [
        int(m.group(1)) for m in re.finditer(r"a=candidate:\S+ \d+ udp \d+ \S+ (\d+) typ host", sdp, re.I)
    ]


async def offer_status(url: str) -> tuple[int, dict[str, Any]]:
    client = Client([INPUT])
    try:
        await client.pc.setLocalDescription(await client.pc.createOffer())
        body = {"sdp": client.pc.localDescription.sdp, "type": "offer"}
        async with aiohttp.ClientSession() as http, http.post(url + "/offer", json=body) as r:
            return r.status, await r.json()
    finally:
        await client.close()


def test_sessions_spread_over_both_workers_with_frames_stats_metrics_and_503(workers: Any) -> None:
    async def main() -> None:
        async with front_of(workers) as (url, front):
            clients = [Client([INPUT]) for _ in range(4)]
            for client in clients:
                await client.connect(url)
            try:
                placed = [await worker_of(url, c.session) for c in clients]
                assert sorted(placed) == [W1, W1, W2, W2]
                for client in clients:  # processed frames back from each worker, at the input's size
                    await client.wait_frames(3, timeout=60)
                    assert client.received[-1].to_ndarray(format="rgb24").shape == INPUT.shape
                    ports = candidate_ports(client.pc.remoteDescription.sdp)
                    assert ports and all(PORTS[0] <= p <= PORTS[1] for p in ports), ports
                # all 4 places taken: 503 with the reason
                status, body = await offer_status(url)
                assert status == 503 and "cluster is full" in body["error"] and "4 places" in body["error"], (
                    body
                )
                # /stats and /metrics add up both workers, each labelled
                status, stats = await get(url, "/stats")
                assert status == 200 and stats["session_count"] == 4
                assert sorted(s["worker"] for s in stats["sessions"]) == [W1, W1, W2, W2]
                assert {w["worker"]: w["sessions"] for w in stats["workers"]} == {W1: 2, W2: 2}
                # users' prompts only to the token (none here): the workers' answers to the front are stripped
                assert all("prompt" not in s["settings"] for s in stats["sessions"]), stats["sessions"]
                status, text = await get(url, "/metrics")
                assert status == 200
                for name in (W1, W2):
                    assert f'stream_sessions{{worker="{name}"}} 2.0' in text, text[:2000]
                    assert f'stream_cluster_worker_up{{worker="{name}"}} 1.0' in text
                    assert re.search(
                        rf'stream_frames_out_total{{session="\w[^"]*",worker="{name}"}} [1-9]', text
                    )
                assert text.count("# TYPE stream_sessions gauge") == 1  # one family, two labelled samples
                status, health = await get(url, "/health")
                assert status == 200 and health["max_sessions"] == 4 and health["model"].startswith("tiny")
                assert [w["state"] for w in health["workers"]] == [READY, READY]
            finally:
                for client in clients:
                    await client.close()
            # hung up: the workers free the places, the front sees it
            await until(lambda: not front.pool.routes and front.pool.ended, timeout=30)

    asyncio.run(main())


def test_the_front_caps_the_sessions_of_one_address(workers: Any) -> None:
    """Every offer reaches a worker from the front: the front counts each peer's sessions itself."""

    async def main() -> None:
        pool = WorkerPool(SETTINGS, workers=2, gpu=False, poll_interval=0.2, scale_interval=1.0)
        front = ClusterFront(pool, CONFIG, max_sessions=2)
        async with running(front, peers=True) as url:
            await until(lambda: len(pool.views) == 2 and all(w.state == READY for w in pool.views.values()))
            clients = [Client([INPUT]) for _ in range(4)]
            try:
                # three offers at once from one address: offers still being placed count too
                answers = await asyncio.gather(*(c.offer(url, peer="203.0.113.7") for c in clients[:3]))
                assert sorted(status for status, _ in answers) == [200, 200, 429], answers
                for (status, body), client in zip(answers, clients[:3], strict=True):
                    if status == 200:
                        await client.answered(body)
                    else:
                        assert "already holds 2 session(s)" in body["error"], body
                await clients[3].connect(url, peer="198.51.100.9")  # another address is not refused
                expected = ["198.51.100.9", *["203.0.113.7"] * 2]
                assert sorted(str(a) for a in front.addresses.values()) == expected
                # each worker keeps its sessions' peers (named by the front) and reports them
                await until(lambda: sorted(map(str, reported(pool).values())) == expected, timeout=30)
                # a session the front did not place itself (taken back from a worker's status) still counts
                front.addresses.clear()
                clients.append(Client([INPUT]))
                status, body = await clients[-1].offer(url, peer="203.0.113.7")
                assert status == 429 and "already holds 2 session(s)" in body["error"], body
            finally:
                for client in clients:
                    await client.close()
            await until(lambda: not front.pool.routes, timeout=30)

    asyncio.run(main())


def reported(pool: WorkerPool) -> dict[str, Any]:
    """Session -> peer address, as the workers' last statuses report them."""
    return {s: a for view in pool.views.values() for s, a in view.status.get("addresses", {}).items()}


async def whip_session(url: str) -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection()
    pc.addTransceiver(ClipTrack([INPUT]), direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    headers = {"Content-Type": "application/sdp"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(url + "/whip", data=pc.localDescription.sdp, headers=headers) as r,
    ):
        assert r.status == 201, await r.text()
        location, answer = r.headers["Location"], await r.text()
    await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    return pc, location


def test_whip_in_and_whep_out_on_the_second_worker(workers: Any) -> None:
    async def main() -> None:
        async with front_of(workers, count=1, peers=True) as (url, _):  # worker 2: found by its name
            browser = Client([INPUT])
            await browser.connect(url)  # takes worker 1: the WHIP session goes to worker 2
            sender, location = await whip_session(url)
            session = location.rsplit("/", 1)[1]
            viewer = RTCPeerConnection()
            received: list[Any] = []
            try:
                assert await worker_of(url, browser.session) == W1
                assert await worker_of(url, session) == W2
                viewer.addTransceiver("video", direction="recvonly")

                @viewer.on("track")
                def on_track(track: Any) -> None:
                    async def read() -> None:
                        while True:
                            received.append(await track.recv())

                    asyncio.ensure_future(read())

                await viewer.setLocalDescription(await viewer.createOffer())
                async with aiohttp.ClientSession() as http:
                    sdp, headers = viewer.localDescription.sdp, {"Content-Type": "application/sdp"}
                    # another's session needs its view key, through the front as on one server
                    async with http.post(f"{url}/whep/{browser.session}", data=sdp, headers=headers) as r:
                        assert r.status == 401 and "view key" in (await r.json())["error"]
                    key = f"{url}/whep/{browser.session}?key={browser.view_key}"
                    async with http.post(key, data=sdp, headers=headers) as r:  # its page's key: allowed
                        assert r.status == 201, await r.text()
                        keyed = r.headers["Location"]
                    async with http.delete(f"{url}{keyed}?key={browser.view_key}") as r:
                        assert r.status == 200
                    # the front names each viewer's peer to the worker, which caps one address's viewers
                    peer = {**headers, PEER: "203.0.113.7"}
                    places = []
                    for _ in range(Limits().max_viewers_per_address):
                        async with http.post(f"{url}/whep", data=sdp, headers=peer) as r:  # the newest
                            assert r.status == 201, await r.text()
                            places.append(r.headers["Location"])
                    async with http.post(f"{url}/whep", data=sdp, headers=peer) as r:
                        assert r.status == 429 and "--max-viewers-per-address" in (await r.json())["error"]
                    for place in places:
                        async with http.delete(url + place) as r:
                            assert r.status == 200
                    # by session id too (its page's key), and the peer's own X-Forwarded-For is not believed
                    places = []
                    for i in range(Limits().max_viewers_per_address + 1):
                        spoofed = {**peer, "X-Forwarded-For": f"192.0.2.{i}"}
                        async with http.post(key, data=sdp, headers=spoofed) as r:
                            body = await r.text()
                            if i < Limits().max_viewers_per_address:
                                assert r.status == 201, body
                                places.append(r.headers["Location"])
                            else:
                                assert r.status == 429 and "--max-viewers-per-address" in body, body
                    for place in places:
                        async with http.delete(f"{url}{place}?key={browser.view_key}") as r:
                            assert r.status == 200
                    # the WHIP session (no view key) is the newest: `POST /whep` plays it
                    async with http.post(f"{url}/whep", data=sdp, headers=headers) as r:
                        assert r.status == 201, await r.text()
                        playback, answer = r.headers["Location"], await r.text()
                    assert playback.startswith(f"/whep/{session}/"), playback
                    await viewer.setRemoteDescription(RTCSessionDescription(answer, "answer"))
                    await until(lambda: len(received) >= 3, timeout=60)
                    assert received[-1].to_ndarray(format="rgb24").shape == INPUT.shape
                    async with http.delete(url + playback) as r:
                        assert r.status == 200
                    async with http.delete(url + location) as r:
                        assert r.status == 200
                    async with http.delete(url + location) as r:  # ended: the front says so
                        assert r.status == 404 and "ended" in (await r.json())["error"]
            finally:
                await viewer.close()
                await sender.close()
                await browser.close()

    asyncio.run(main())


def test_a_killed_worker_ends_its_sessions_and_rejoins_after_ray_restarts_it(workers: Any) -> None:
    async def main() -> None:
        async with front_of(workers) as (url, front):
            first, second = Client([INPUT]), Client([INPUT])
            clients = [first, second]
            try:
                await first.connect(url)
                await second.connect(url)
                assert [await worker_of(url, c.session) for c in clients] == [W1, W2]
                pid = await call(workers[0].pid)
                os.kill(pid, signal.SIGKILL)
                # its session ends with the reason; the other keeps streaming
                await until(lambda: first.session in front.pool.ended, timeout=30)
                status, body = await get(url, f"/sessions/{first.session}")
                assert body["state"] == "ended" and f"{W1} stopped" in body["reason"], body
                assert await worker_of(url, second.session) == W2
                # new sessions go to the worker left, until it is full
                third = Client([INPUT])
                clients.append(third)
                await third.connect(url)
                assert await worker_of(url, third.session) == W2
                await third.wait_frames(2, timeout=60)
                status, body = await offer_status(url)  # worker 2 is full now
                if status != 200:  # (200 only when worker 1 is back already, on a fast machine)
                    assert status == 503 and "1 more worker(s) not ready" in body["error"], body
                # Ray restarts it; it takes sessions again
                await until(lambda: front.pool.views[W1].state == READY, timeout=120)
                assert await call(workers[0].pid) != pid
                fourth = Client([INPUT])
                clients.append(fourth)
                await fourth.connect(url)
                assert await worker_of(url, fourth.session) == W1
                await fourth.wait_frames(2, timeout=60)
            finally:
                for client in clients:
                    await client.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--cluster", "dask"], "--cluster must be ray, ray:local or ray:ADDRESS"),
        (["--cluster", "ray:"], "needs an address after the colon"),
        (["--workers", "2"], "add --cluster ray:local"),
        (["--cluster", "ray:local", "--workers", "0"], "--workers must be at least 1, got 0"),
        (["--cluster", "ray:local", "--rtc-ports", "80-90"], "1024 <= LOW <= HIGH"),
        (["--cluster", "ray:local", "--rtc-ports", "5000-4000"], "--rtc-ports must be LOW-HIGH"),
        (["--cluster", "ray:local", "--rtc-ports", "a-b"], "must look like 40000-40999"),
        (["--cluster", "ray:local", "--virtualcam"], "does not work with --cluster"),
    ],
)
def test_cluster_arguments_are_checked_before_starting_anything(
    extra: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--model", "tiny", *extra]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err


def test_the_front_is_served_with_the_slow_client_bounds(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The front listens as `stream serve` alone does (listen.serve: --read-timeout's 408, --max-reading),
    not with aiohttp's defaults; Ray itself is not started here."""
    from stream.server import listen

    served: dict[str, Any] = {}

    def serve(server: Any, sockets: list[Any], on_listening: Any) -> None:
        served.update(server=server, sockets=len(sockets))
        on_listening()

    monkeypatch.setattr(listen, "serve", serve)
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {})
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    argv = [
        "serve",
        "--cluster",
        "ray:local",
        "--workers",
        "1",
        "--model",
        "tiny",
        "--port",
        str(free_port()),
    ]
    assert main([*argv, "--read-timeout", "3", "--max-reading", "5"]) == 0
    front = served["server"]
    assert isinstance(front, ClusterFront) and served["sockets"] >= 1
    assert front.limits.read_timeout == 3 and front.limits.max_reading == 5
    assert "serving the front of a Ray cluster" in capsys.readouterr().err


def test_placement_takes_the_least_loaded_ready_worker_and_says_why_when_none() -> None:
    a = WorkerView("w1", 1, READY, sessions=1, max_sessions=4)
    b = WorkerView("w2", 2, READY, sessions=1, max_sessions=2)
    c = WorkerView("w3", 3, STARTING, reason="restarting", max_sessions=4)
    assert pick([a, b, c]) is a  # 1/4 loaded before 1/2; w3 is not ready
    a.sessions = 2
    assert pick([a, b, c]) is a  # equal load: the first
    b.over_budget = 0
    a.over_budget = 1
    assert pick([a, b, c]) is b  # equal load: the one whose sessions hold their budget
    assert pick([a, b, c], exclude={"w2"}) is a
    a.sessions, b.sessions = 4, 2
    assert pick([a, b, c]) is None
    assert why_full([a, b, c]) == (
        "the cluster is full: all 6 places on 2 worker(s) are taken (1 more worker(s) not ready); try again later"
    )
    a.state = b.state = STARTING
    assert "no worker is ready yet" in why_full([a, b, c]) and "w3 starting: restarting" in why_full(
        [a, b, c]
    )
    assert "no workers yet" in why_full([])


def test_the_page_reads_why_a_session_ended_from_the_front(workers: Any, chromium: str) -> None:
    from playwright.sync_api import sync_playwright

    pool = WorkerPool(SETTINGS, workers=2, gpu=False, poll_interval=0.2, scale_interval=1.0)
    with ServerThread(ClusterFront(pool, CONFIG, max_sessions=2)) as thread:
        url = f"http://127.0.0.1:{thread.port}"

        async def whip_and_hang_up() -> str:
            await until(lambda: [w.state for w in pool.ordered()] == [READY, READY], timeout=120)
            sender, location = await whip_session(url)
            async with aiohttp.ClientSession() as http, http.delete(url + location) as r:
                assert r.status == 200
            await sender.close()
            session = location.rsplit("/", 1)[1]
            await until(lambda: session in pool.ended, timeout=30)
            return session

        session = asyncio.run(whip_and_hang_up())
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.goto(url + "/")
                reason = page.evaluate(
                    "id => import('/static/status.js').then((m) => m.endReason(id))", session
                )
                unknown = page.evaluate("() => import('/static/status.js').then((m) => m.endReason('nope'))")
            finally:
                browser.close()
    assert reason == "ended by its WHIP client (DELETE)" and unknown == ""


def test_the_benchmark_refuses_bad_arguments_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import cluster as cluster_bench

    assert cluster_bench.main(["--workers", "1,x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--workers must be counts separated by commas" in err, err
