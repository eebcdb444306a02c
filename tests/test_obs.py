"""OBS: WHIP ingest (what OBS 30+ sends), WHEP playback through the relay, bad WHIP/WHEP requests, and
the newest session's output published to a virtual camera."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError

from stream import stamp
from stream.cli import main
from stream.config import StreamConfig
from stream.denoiser import StreamDenoiser
from stream.models import load_model
from stream.server import StreamServer
from stream.server.limits import Limits
from tests.conftest import pan_clip
from tests.test_server import CONFIG, PEER, ClipTrack, running, until

SIZE = (120, 160)  # (h, w) of what the encoder sends
TOKEN = "obs-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def tiny_factory(tiny_model_dir: Any) -> Callable[[StreamConfig], StreamDenoiser]:
    components = load_model(CONFIG)
    return lambda config: StreamDenoiser(components, config)


def make_server(factory: Callable[[StreamConfig], Any], **kwargs: Any) -> StreamServer:
    return StreamServer(CONFIG, factory, model_name="tiny", placeholder=True, token=TOKEN, **kwargs)


class ObsEncoder:
    """What OBS 30+ sends over WHIP: H.264 video and Opus audio, sendonly, every candidate in one offer."""

    def __init__(self, frames: list[np.ndarray], codec: str = "video/H264") -> None:
        self.pc = RTCPeerConnection()
        video = self.pc.addTransceiver(ClipTrack(frames), direction="sendonly")
        video.setCodecPreferences(
            [c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType == codec]
        )
        audio = self.pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
        opus = [c for c in RTCRtpSender.getCapabilities("audio").codecs if c.mimeType == "audio/opus"]
        audio.setCodecPreferences(opus)
        self.location = ""
        self.answer = ""

    async def publish(self, url: str, query: str = "") -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())  # gathers every candidate
        offer = self.pc.localDescription.sdp
        assert "a=candidate:" in offer and "opus/48000" in offer
        headers = {**AUTH, "Content-Type": "application/sdp"}
        async with (
            aiohttp.ClientSession() as http,
            http.post(url + "/whip" + query, data=offer, headers=headers) as r,
        ):
            self.answer = await r.text()
            assert r.status == 201, self.answer
            assert r.content_type == "application/sdp" and r.headers["Access-Control-Allow-Origin"] == "*"
            self.location = r.headers["Location"]
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=self.answer, type="answer"))

    @property
    def session(self) -> str:
        return self.location.rsplit("/", 1)[-1]


class WhepViewer:
    """A WHEP player: one recvonly video transceiver; records (frame, arrival time)."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection()
        self.pc.addTransceiver("video", direction="recvonly")
        self.received: list[tuple[av.VideoFrame, float]] = []
        self.ended = asyncio.Event()
        self.location = ""
        self._reader: asyncio.Task[None] | None = None

        @self.pc.on("track")
        def on_track(track: Any) -> None:
            self._reader = asyncio.create_task(self._read(track))

    async def _read(self, track: Any) -> None:
        try:
            while True:
                frame = await track.recv()
                self.received.append((frame, time.monotonic()))
        except MediaStreamError:
            self.ended.set()

    async def play(self, url: str, path: str = "/whep", peer: str | None = None) -> None:
        """Offer to watch at `path`; as if from the address `peer` (with running(..., peers=True))."""
        await self.pc.setLocalDescription(await self.pc.createOffer())
        headers = {**AUTH, "Content-Type": "application/sdp", **({PEER: peer} if peer else {})}
        async with (
            aiohttp.ClientSession() as http,
            http.post(url + path, data=self.pc.localDescription.sdp, headers=headers) as r,
        ):
            answer = await r.text()
            assert r.status == 201, answer
            self.location = r.headers["Location"]
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))

    async def wait_frames(self, count: int, timeout: float = 30.0) -> None:
        await until(lambda: len(self.received) >= count, timeout)

    async def close(self) -> None:
        await self.pc.close()
        if self._reader:
            self._reader.cancel()


def stamped_clip(frames: int = 40) -> list[np.ndarray]:
    return [stamp.stamp(f.copy(), i + 1) for i, f in enumerate(pan_clip(frames, SIZE, step=3))]


def test_obs_whip_in_whep_out_and_delete(tiny_factory: Callable[[StreamConfig], StreamDenoiser]) -> None:
    async def main() -> None:
        server = make_server(tiny_factory)
        async with running(server) as url:
            # 1. OBS publishes: 201, the session's Location, an H.264 answer; its audio is consumed.
            obs = ObsEncoder(stamped_clip())
            await obs.publish(
                url, "?stamp=1"
            )  # carry the frame IDs through, to compare viewers frame by frame
            assert obs.location == f"/whip/{obs.session}"
            video = obs.answer.split("m=video")[1].split("m=audio")[0]
            assert "H264/90000" in video and "VP8" not in video and "a=candidate:" in obs.answer
            session = server.sessions[obs.session]
            assert session.kind == "whip" and session.stamp
            # 2. Three WHEP viewers of the one processed stream (by id, and the newest via POST /whep).
            viewers = [WhepViewer() for _ in range(3)]
            await viewers[0].play(url, f"/whep/{obs.session}")
            await viewers[1].play(url, f"/whep/{obs.session}")
            await viewers[2].play(url)
            assert all(v.location.startswith(f"/whep/{obs.session}/") for v in viewers)
            for viewer in viewers:
                await viewer.wait_frames(10)
            await asyncio.sleep(1.0)
            for viewer in viewers:
                frame = viewer.received[-1][0].to_ndarray(format="rgb24")
                assert frame.shape == (*SIZE, 3)  # the encoder's size, processed
            assert session.source is not None and len(server.viewers) == 3
            # No buffering per viewer: the same frame reaches every viewer at about the same time.
            seen: list[dict[int, float]] = []
            for viewer in viewers:
                arrivals: dict[int, float] = {}
                for frame, at in viewer.received:
                    frame_id = stamp.read(frame.to_ndarray(format="rgb24"))
                    if frame_id is not None:
                        arrivals.setdefault(frame_id, at)
                seen.append(arrivals)
            common = set(seen[0]) & set(seen[1]) & set(seen[2])
            assert len(common) >= 5, [len(s) for s in seen]
            spread = sorted(max(s[i] for s in seen) - min(s[i] for s in seen) for i in common)
            # (the median, with room for a loaded machine: a buffering viewer falls further behind)
            assert spread[len(spread) // 2] < 0.5, spread
            async with aiohttp.ClientSession() as http:
                # 3. A viewer leaves with DELETE; twice is 404.
                async with http.delete(url + viewers[2].location, headers=AUTH) as r:
                    assert r.status == 200
                async with http.delete(url + viewers[2].location, headers=AUTH) as r:
                    assert r.status == 404 and "no viewer" in (await r.json())["error"]
                assert len(server.viewers) == 2
                # 4. OBS stops: DELETE ends the session and its viewers; twice is 404.
                async with http.delete(url + obs.location, headers=AUTH) as r:
                    assert r.status == 200
                assert obs.session not in server.sessions and not server.viewers
                await asyncio.wait_for(viewers[0].ended.wait(), 10)
                async with http.delete(url + obs.location, headers=AUTH) as r:
                    assert r.status == 404 and "no WHIP session" in (await r.json())["error"]
            assert session.closed and all(t.done() for t in session.tasks)
            for viewer in viewers:
                await viewer.close()
            await obs.pc.close()

    asyncio.run(main())


def test_one_address_holds_at_most_max_viewers_per_address_viewers(
    tiny_factory: Callable[[StreamConfig], StreamDenoiser],
) -> None:
    """One address cannot take every viewer place: past --max-viewers-per-address (2) it gets 429,
    while another address and this machine still get in; ending one of its viewers lets it in again."""

    async def main() -> None:
        server = make_server(tiny_factory, max_viewers=8, limits=Limits(max_viewers_per_address=2))
        async with running(server, peers=True) as url:
            obs = ObsEncoder(pan_clip(20, SIZE, step=3))
            await obs.publish(url)
            path = f"/whep/{obs.session}"
            mine = [WhepViewer(), WhepViewer()]
            others = [WhepViewer() for _ in range(5)]
            try:
                for viewer in mine:
                    await viewer.play(url, path, peer="203.0.113.7")
                refused = WhepViewer()
                others.append(refused)
                await refused.pc.setLocalDescription(await refused.pc.createOffer())
                headers = {**AUTH, "Content-Type": "application/sdp", PEER: "203.0.113.7"}
                async with (
                    aiohttp.ClientSession() as http,
                    http.post(url + path, data=refused.pc.localDescription.sdp, headers=headers) as r,
                ):
                    body = await r.json()
                    assert r.status == 429 and r.headers["Access-Control-Allow-Origin"] == "*"
                    assert "already holds 2 viewer(s)" in body["error"], body
                    assert "--max-viewers-per-address 2" in body["error"]
                await others[0].play(url, path, peer="198.51.100.9")  # another address is not refused
                for viewer in others[1:4]:  # nor is this machine (127.0.0.1), past the cap too
                    await viewer.play(url, path)
                assert len(server.viewers) == 6
                async with (
                    aiohttp.ClientSession() as http,
                    http.delete(url + mine[0].location, headers={**AUTH, PEER: "203.0.113.7"}) as r,
                ):
                    assert r.status == 200
                await others[4].play(url, path, peer="203.0.113.7")  # its place is free again
                await others[4].wait_frames(2)
            finally:
                for viewer in (*mine, *others):
                    await viewer.close()
                await obs.pc.close()

    asyncio.run(main())


def test_bad_whip_and_whep_requests_disturb_nothing(
    tiny_factory: Callable[[StreamConfig], StreamDenoiser],
) -> None:
    async def main() -> None:
        server = make_server(tiny_factory, max_viewers=2)
        async with running(server) as url:
            obs = ObsEncoder(pan_clip(20, SIZE, step=3))
            await obs.publish(url)
            viewer = WhepViewer()
            await viewer.play(url, f"/whep/{obs.session}")
            await viewer.wait_frames(3)
            sdp = viewer.pc.localDescription.sdp
            audio_only = sdp.split("m=video")[0] + "m=audio 9 UDP/TLS/RTP/SAVPF 0\r\nc=IN IP4 0.0.0.0\r\n"
            as_sdp = {**AUTH, "Content-Type": "application/sdp"}
            async with aiohttp.ClientSession() as http:

                async def call(method: str, path: str, body: str = "", **headers: str) -> tuple[int, str]:
                    async with http.request(method, url + path, data=body, headers=headers or as_sdp) as r:
                        text = await r.text()
                        return r.status, text

                cases = [
                    (
                        await call("POST", "/whip", "v=0", **{**AUTH, "Content-Type": "application/json"}),
                        415,
                        "application/sdp",
                    ),
                    (await call("POST", "/whip", "", **AUTH), 415, "application/sdp"),
                    (await call("POST", "/whip", "this is not sdp"), 400, "invalid SDP"),
                    (await call("POST", "/whip?stamp=yes", sdp), 400, "stamp must be 0 or 1"),
                    (await call("POST", "/whip", ""), 400, "empty"),
                    (await call("POST", "/whip", audio_only), 400, "no video"),
                    (await call("POST", "/whip", sdp, **{"Content-Type": "application/sdp"}), 401, "token"),
                    (
                        await call(
                            "POST",
                            "/whip",
                            sdp,
                            **{"Content-Type": "application/sdp", "Authorization": "Bearer nope"},
                        ),
                        401,
                        "token",
                    ),
                    (await call("POST", "/whep/nosuchsession", sdp), 404, "no session 'nosuchsession'"),
                    (await call("POST", f"/whep/{obs.session}", "garbage"), 400, "invalid SDP"),
                    (await call("DELETE", "/whip/nosuchsession", **AUTH), 404, "no WHIP session"),
                    (await call("DELETE", f"/whep/{obs.session}/nosuchviewer", **AUTH), 404, "no viewer"),
                    (
                        await call(
                            "PATCH",
                            obs.location,
                            "a=candidate:1",
                            **{**AUTH, "Content-Type": "application/trickle-ice-sdpfrag"},
                        ),
                        405,
                        "trickle ICE",
                    ),
                ]
                for (status, text), want, words in cases:
                    assert status == want and words in text, (status, text, words)
                # CORS preflight needs no token and names what a page may send.
                async with http.options(url + "/whip") as r:
                    assert r.status == 204 and "POST" in r.headers["Access-Control-Allow-Methods"]
                    assert "Location" in r.headers["Access-Control-Expose-Headers"]
                # Viewers are capped: the third gets 503 with a reason.
                extra = [WhepViewer(), WhepViewer()]
                await extra[0].play(url, f"/whep/{obs.session}")
                await extra[1].pc.setLocalDescription(await extra[1].pc.createOffer())
                status, text = await call("POST", f"/whep/{obs.session}", extra[1].pc.localDescription.sdp)
                assert status == 503 and "too many viewers" in text
                # The stream went on through all of it.
                count = len(viewer.received)
                await viewer.wait_frames(count + 5)
                assert obs.session in server.sessions and server.sessions[obs.session].inputs.puts > 5
            for v in (viewer, *extra):
                await v.close()
            await obs.pc.close()
            # No session at all: POST /whep says so.
            await until(lambda: not server.sessions, timeout=30)
            lone = WhepViewer()
            await lone.pc.setLocalDescription(await lone.pc.createOffer())
            async with (
                aiohttp.ClientSession() as http,
                http.post(url + "/whep", data=lone.pc.localDescription.sdp, headers=as_sdp) as r,
            ):
                assert r.status == 404 and "no session is running yet" in (await r.json())["error"]
            await lone.close()

    asyncio.run(main())


class ListSink:
    """A virtual camera stand-in for the server: keeps what it is given."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []

    def write(self, frame: np.ndarray) -> None:
        self.frames.append(frame)

    def close(self) -> None:
        pass


def test_virtual_camera_gets_the_newest_sessions_output(
    tiny_factory: Callable[[StreamConfig], StreamDenoiser],
) -> None:
    async def main() -> None:
        sink = ListSink()
        server = make_server(tiny_factory, virtualcam=sink)
        async with running(server) as url:
            first = ObsEncoder(pan_clip(10, SIZE, step=3))
            await first.publish(url)
            await until(lambda: len(sink.frames) >= 3)
            assert sink.frames[-1].shape == (*SIZE, 3)
            # A second, smaller source starts: the camera follows the newest session.
            second = ObsEncoder(pan_clip(10, (96, 128), step=3))
            await second.publish(url)
            await until(lambda: sink.frames[-1].shape == (96, 128, 3))
            count = len(sink.frames)
            await until(lambda: len(sink.frames) >= count + 3)
            assert all(f.shape == (96, 128, 3) for f in sink.frames[count:])
            # It leaves: back to the first.
            async with aiohttp.ClientSession() as http, http.delete(url + second.location, headers=AUTH) as r:
                assert r.status == 200
            await until(lambda: sink.frames[-1].shape == (*SIZE, 3))
            for encoder in (first, second):
                await encoder.pc.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--virtualcam-device", "/dev/video7"], "--virtualcam-device needs --virtualcam"),
        (["--max-viewers", "-1"], "--max-viewers must be 0 or more"),
    ],
)
def test_serve_obs_arguments(extra: list[str], words: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["serve", "--model", "tiny", *extra]) == 2
    assert words in capsys.readouterr().err


def test_serve_virtualcam_without_a_device_names_the_fix(capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("pyvirtualcam")
    import sys

    if sys.platform != "linux":
        pytest.skip("the Linux message is checked here")
    import glob

    if glob.glob("/dev/video*"):
        pytest.skip("this machine has a video device")
    assert main(["serve", "--model", "tiny", "--virtualcam"]) == 2
    err = capsys.readouterr().err
    assert "v4l2loopback" in err and "exclusive_caps=1" in err and "Traceback" not in err


def test_run_virtualcam_device_needs_the_virtualcam_sink(capsys: pytest.CaptureFixture) -> None:
    args = ["run", "--source", "synthetic", "--sink", "out.mp4", "--virtualcam-device", "/dev/video3"]
    assert main(args) == 2
    assert "--virtualcam-device goes with --sink virtualcam" in capsys.readouterr().err


@pytest.mark.parametrize("path", ["whip", "offer"])
def test_obs_e2e_benchmark_measures_latency(
    path: str, tiny_model_dir: Any, capsys: pytest.CaptureFixture
) -> None:
    from benchmarks.obs_e2e import main as obs_e2e

    args = [
        "--path",
        path,
        "--size",
        "128",
        "--steps",
        "1",
        "--guidance",
        "1",
        "--seconds",
        "3",
        "--warmup",
        "1",
    ]
    assert obs_e2e(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["benchmark"] == "obs_e2e" and result["received_size"] == [128, 128]
    assert (
        result["latency_count"] >= 5
        and result["latency_ms"]["p50"] > 0
        and result["latency_ms"]["p95"] < 10_000
    )
    assert ("WHIP" in result["path"]) == (path == "whip") and result["received_fps"] > 1


def test_whip_takes_vp8_too(tiny_factory: Callable[[StreamConfig], StreamDenoiser]) -> None:
    async def main() -> None:
        server = make_server(tiny_factory)
        async with running(server) as url:
            encoder = ObsEncoder(pan_clip(10, SIZE, step=3), codec="video/VP8")
            await encoder.publish(url)
            assert "VP8/90000" in encoder.answer and "H264" not in encoder.answer
            viewer = WhepViewer()
            await viewer.play(url)
            await viewer.wait_frames(5)
            assert viewer.received[-1][0].to_ndarray(format="rgb24").shape == (*SIZE, 3)
            await viewer.close()
            await encoder.pc.close()

    asyncio.run(main())


def test_abandoned_viewers_and_closed_sessions_are_freed(
    tiny_factory: Callable[[StreamConfig], StreamDenoiser], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A WHEP offer whose client never connects frees its place; a closed session leaves nothing behind."""
    import gc
    import weakref

    import stream.server.app

    monkeypatch.setattr(stream.server.app, "VIEWER_CONNECT_TIMEOUT", 1.0)

    async def main() -> None:
        server = make_server(tiny_factory, max_viewers=1, ice_servers=["turn:user:hunter2@127.0.0.1:3478"])
        async with running(server) as url:
            encoder = ObsEncoder(pan_clip(10, SIZE, step=3))
            await encoder.publish(url)
            session = server.sessions[encoder.session]
            await until(lambda: session.denoiser is not None)
            denoiser = weakref.ref(session.denoiser)  # type: ignore[arg-type]
            whole = weakref.ref(session)
            # An offer posted, the answer never used: the viewer's place is freed after the timeout.
            ghost = RTCPeerConnection()
            ghost.addTransceiver("video", direction="recvonly")
            await ghost.setLocalDescription(await ghost.createOffer())
            headers = {**AUTH, "Content-Type": "application/sdp"}
            async with aiohttp.ClientSession() as http:
                async with http.post(url + "/whep", data=ghost.localDescription.sdp, headers=headers) as r:
                    assert r.status == 201 and 'rel="ice-server"' in r.headers["Link"]  # RFC 9725 4.6
                assert len(server.viewers) == 1
                await until(lambda: not server.viewers, timeout=10)
                # The ICE servers' credentials are not handed to anyone without the token.
                async with http.options(url + "/whep") as r:
                    assert r.status == 204 and "Link" not in r.headers
                async with http.post(
                    url + "/whip", data="v=0", headers={"Content-Type": "application/sdp"}
                ) as r:
                    assert r.status == 401 and r.headers["Access-Control-Allow-Origin"] == "*"
                async with http.delete(url + encoder.location, headers=AUTH) as r:
                    assert r.status == 200
            await ghost.close()
            await encoder.pc.close()
            await asyncio.sleep(0.5)
            gc.collect()
            # The closed session's model state and last frame are freed; nothing of the server keeps it.
            assert denoiser() is None and session.output is None and session.closed
            assert not server.viewers and server.published is None and not server.worker.sessions  # type: ignore[union-attr]
            session = None  # type: ignore[assignment]
            gc.collect()
            assert whole() is None  # nothing (relay, viewer, worker, reaper) keeps the closed session

    asyncio.run(main())
