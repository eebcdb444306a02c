"""`stream serve` and `stream run` as a user types them: the port, the start-up lines, the CPU size,
model errors in one line, and what the server's terminal says during sessions."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from stream.args import configure_logging
from tests.test_server import INPUT, Client, make_server, running


def stream_cli(*args: str) -> subprocess.Popen[str]:
    """`python -m stream ARGS` from the worktree, as a user would run `stream ARGS`."""
    return subprocess.Popen(
        [sys.executable, "-m", "stream", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_port_in_use_is_said_before_the_model_loads() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = stream_cli("serve", "--model", "tiny", "--port", str(port))
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err
    assert "loading model" not in err  # refused before the slow part
    assert err.strip().splitlines() == [
        f"stream: error: port {port} on 127.0.0.1 is already in use (another `stream serve`?): stop that one, "
        f"or pick another port with --port {port + 1}"
    ]


def test_serving_is_said_once_the_socket_listens_at_a_measured_cpu_size(tiny_model_dir: Path) -> None:
    """No --width: on a CPU the server measures sizes in the warm-up and starts at one that holds 24 FPS
    (or the smallest), says it with the expected FPS, and answers as soon as it says it is serving."""
    port = free_port()
    proc = stream_cli("serve", "--model", "tiny", "--port", str(port))
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line.rstrip())
            if line.startswith("stream: serving"):
                # No retry: the socket listens when this line is printed.
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
                    health = json.load(r)
                break
        serving = lines[-1]
        match = re.fullmatch(
            rf"stream: serving tiny \(built-in\) at (\d+)x(\d+), expect up to (\d+(?:\.\d)?) FPS on "
            rf"http://127.0.0.1:{port}/ \(Ctrl-C to stop\)",
            serving,
        )
        assert match, lines
        width, height, fps = int(match[1]), int(match[2]), float(match[3])
        assert 0 < fps <= 24 and width == height <= 512
        assert health["settings"]["width"] == width and [width, height] in health["sizes"]
        assert health["sizes"][-1] == [512, 512]  # the larger sizes stay on offer in the page
        if width < 512:  # the reason is said, with what was measured
            note = next(line for line in lines if line.startswith("stream: CPU: sessions start at"))
            assert f"{width}x{height}" in note and "512x512" in note and "FPS" in note
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_model_errors_are_one_line_that_says_what_to_do(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = str(tmp_path / "o.mp4")
    proc = stream_cli("run", "--source", "synthetic", "--sink", out, "--model", "some/missing-id", "-q")
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 2
    (line,) = err.strip().splitlines()  # one line: no library text, no note about the empty output
    assert line.startswith(
        "stream: error: could not load model 'some/missing-id': it is not in the Hugging Face cache"
    )
    for words in ("--model tiny", "HF_HOME", "local diffusers folder"):
        assert words in line
    assert "local_files_only" not in line and len(line) < 400

    # `auto` without network: one warning line with the reason and the fixes, then the tiny model runs.
    small = ["--width", "128", "--height", "128", "--steps", "1", "--frames", "2", "-q"]
    proc = stream_cli("run", "--source", "synthetic", "--sink", out, "--model", "auto", *small)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    (warning,) = [line for line in err.splitlines() if line.strip()]
    assert warning.startswith("WARNING stream.models.hub: model auto: stabilityai/sd-turbo is not in the")
    assert "built-in tiny model" in warning and "HF_HOME" in warning and "local_files_only" not in warning
    assert len(warning) < 450

    # `auto`'s rule is known once it has loaded: the tiny fallback needs multiples of 16.
    proc = stream_cli(
        "run", "--source", "synthetic", "--sink", out, "--model", "auto", "--width", "520", "-q"
    )
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1] == (
        "stream: error: --width 520 does not fit the model tiny (built-in, auto fallback) "
        "(sizes must be multiples of 16); nearest: 512 or 528"
    )


def test_serve_logs_sessions_adaptive_changes_and_refusals_by_default() -> None:
    root, server_log = logging.getLogger(), logging.getLogger("stream.server")
    saved = root.level, server_log.level
    try:
        configure_logging("serve", verbose=False)
        assert logging.getLogger("stream.server.worker").getEffectiveLevel() == logging.INFO  # adaptive
        assert logging.getLogger("stream.server.signaling").getEffectiveLevel() == logging.INFO
        assert logging.getLogger("stream.models").getEffectiveLevel() == logging.WARNING
    finally:
        root.setLevel(saved[0])
        server_log.setLevel(saved[1])


def test_session_join_leave_and_refusals_are_logged(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from stream.config import StreamConfig
    from stream.denoiser import StreamDenoiser
    from stream.models import load_model
    from tests.test_server import CONFIG

    components = load_model(CONFIG)

    def factory(config: StreamConfig) -> Any:
        return StreamDenoiser(components, config)

    async def main() -> None:
        server = make_server(factory, max_sessions=1, sizes=[(128, 128), (192, 192)])
        async with running(server) as url:
            client = Client([INPUT])
            await client.connect(url, settings={"prompt": "a cat"})
            await client.wait_frames(2)
            reply = await client.send({"type": "settings", "steps": 9})
            assert reply["type"] == "error"
            reply = await client.send({"type": "settings", "width": 192, "height": 192})
            assert reply["type"] == "applied"
            second = Client([INPUT])
            await second.pc.setLocalDescription(await second.pc.createOffer())
            import aiohttp

            body = {"sdp": second.pc.localDescription.sdp, "type": "offer"}
            async with aiohttp.ClientSession() as http, http.post(url + "/offer", json=body) as r:
                assert r.status == 503
            await second.close()
            await client.close()
            deadline = time.monotonic() + 20
            while server.sessions and time.monotonic() < deadline:
                await asyncio.sleep(0.05)

    with caplog.at_level(logging.INFO, logger="stream.server"):
        asyncio.run(main())
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("stream.server"))
    assert re.search(
        r"browser session \S+ from 127\.0\.0\.1 joined \(1 of 1 places\): 128x128, 2 steps, .*prompt 'a cat'",
        text,
    )
    assert re.search(r"session \S+: change refused: steps must be an integer from 1 to 5, got 9", text)
    assert "browser session refused: all 1 places are taken" in text
    assert re.search(r"session \S+ left after \d+ s and \d+ frames: connection (closed|failed)", text), text
