"""`stream run` end to end, and every bad input answered with one clear line and a non-zero exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

from stream.cli import main
from stream.media import VideoFileSink
from tests.conftest import pan_clip

SMALL = ["--model", "tiny", "--width", "128", "--height", "128", "--steps", "2", "--prompt", "a cat", "-q"]


def read_video(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_run_synthetic_to_file(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "out.mp4"
    assert (
        main(
            ["run", "--source", "synthetic", "--sink", str(out), "--frames", "12", "--guidance", "2", *SMALL]
        )
        == 0
    )
    frames = read_video(out)
    assert len(frames) == 12 and frames[0].shape == (128, 128, 3)


def test_run_clip_with_known_motion(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    clip = tmp_path / "pan.mp4"
    sink = VideoFileSink(clip, fps=24)
    for frame in pan_clip(15, (120, 160), step=5):  # a 160x120 window panning over a real photo
        sink.write(frame)
    sink.close()
    out = tmp_path / "styled.mkv"
    code = main(["run", "--source", str(clip), "--sink", str(out), *SMALL[:-1], "--latent-feedback", "0.3"])
    assert code == 0
    frames = read_video(out)
    assert len(frames) == 15 and frames[0].shape == (120, 160, 3)  # the input's own size, not the model's
    assert not np.array_equal(frames[0], frames[-1])  # the input moves, so does the output
    status = capsys.readouterr().err
    assert "frames 15" in status and "fps" in status and "denoise" in status


def test_stream_batch_writes_every_frame_of_a_file(tmp_path: Path, tiny_model_dir: Path) -> None:
    """With Stream Batch the last inputs are still in flight when the file ends: they are run to their
    end and written, so the output has as many frames as the input, in order."""
    clip = tmp_path / "pan.mp4"
    sink = VideoFileSink(clip, fps=24)
    for frame in pan_clip(9, (128, 128), step=8):
        sink.write(frame)
    sink.close()
    out, plain = tmp_path / "batched.mkv", tmp_path / "plain.mkv"
    argv = ["run", "--source", str(clip), *SMALL, "--steps", "3", "--similarity-threshold", "0.995"]
    assert main([*argv, "--sink", str(out), "--stream-batch"]) == 0
    assert main([*argv, "--sink", str(plain)]) == 0
    batched, each = read_video(out), read_video(plain)
    assert len(batched) == len(each) == 9
    # fixed noise, no feedback: Stream Batch only delays each frame (video coding aside)
    assert all(np.abs(a.astype(np.int16) - b).mean() < 3.0 for a, b in zip(batched, each, strict=True))
    assert main([*argv, "--sink", str(tmp_path / "six.mkv"), "--stream-batch", "--frames", "6"]) == 0
    assert len(read_video(tmp_path / "six.mkv")) == 6


def test_frames_limit_on_a_file(tmp_path: Path, tiny_model_dir: Path) -> None:
    clip = tmp_path / "pan.mp4"
    sink = VideoFileSink(clip, fps=24)
    for frame in pan_clip(10, (128, 128)):
        sink.write(frame)
    sink.close()
    out = tmp_path / "first4.mp4"
    assert main(["run", "--source", str(clip), "--sink", str(out), "--frames", "4", *SMALL]) == 0
    assert len(read_video(out)) == 4


BAD_ARGS = [
    (["--steps", "9"], "steps must be an integer from 1 to 5, got 9"),
    (["--strength", "1.5"], "strength must be in (0, 1], got 1.5"),
    (
        ["--width", "100"],
        "--width 100 does not fit the built-in tiny model (sizes must be multiples of 16); nearest: 96 or 112",
    ),
    (
        ["--model", "random:sd15", "--height", "250"],
        "--height 250 does not fit random:sd15 (an SD architecture) (sizes must be multiples of 8); nearest: 248 or 256",
    ),
    (["--height", "4096"], "height must be a multiple of 8 from 64 to 2048, got 4096"),
    (["--guidance", "-2"], "guidance_scale must be in [0, 30]"),
    (["--latent-feedback", "1"], "latent_feedback must be in [0, 1)"),
    (["--scheduler", "euler"], "scheduler must be one of ddim, lcm"),
    (["--noise", "pink"], "noise must be one of fixed, fresh"),
    (["--similarity-threshold", "2"], "similarity_threshold must be in [0, 1)"),
    (["--device", "gpu0"], "device must be"),
    (["--dtype", "int8"], "dtype must be one of"),
    (["--attention", "flash"], "attention must be one of sdpa, xformers"),
    (["--seed", "-3"], "seed must be an integer"),
    (["--frames", "0"], "--frames must be a positive number"),
    (["--fps", "0"], "--fps must be > 0"),
    (["--model", "/nonexistent/model"], "model path '/nonexistent/model' does not exist"),
    (["--model", "random:sd3"], "unknown random architecture"),
    (["--width", "136"], "multiples of 16"),
]


@pytest.mark.parametrize("extra,words", BAD_ARGS)
def test_bad_settings(extra: list[str], words: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["run", "--source", "synthetic", "--sink", str(tmp_path / "o.mp4"), *SMALL, *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("stream: error: ") and words in err[-1]
    assert not (tmp_path / "o.mp4").exists()


def test_bad_sources_and_sinks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video")
    cases = [
        (["--source", "webcam:7"], "webcam:7 could not be opened"),
        (["--source", "webcam:x"], "webcam:N"),
        (["--source", str(tmp_path / "missing.mp4")], "does not exist"),
        (["--source", str(text)], "cannot read"),
        (["--source", str(tmp_path)], "directory"),
        (["--source", "camera"], "unknown source"),
        (["--sink", "out.gif"], "unknown sink"),
        (["--sink", str(tmp_path / "no" / "dir" / "o.mp4")], "does not exist"),
    ]
    for extra, words in cases:
        args = ["run", "--source", "synthetic", "--sink", str(tmp_path / "o.mp4"), *SMALL, *extra]
        assert main(args) == 2, extra
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("stream: error: ") and words in line, (extra, line)


def console(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "stream.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )  # type: ignore[call-overload]


def test_console_errors_have_no_traceback(tmp_path: Path) -> None:
    proc = console("run", "--source", "webcam:5", "--sink", str(tmp_path / "o.mp4"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip().splitlines()[-1]] and "webcam:5" in err
    proc = console("run", "--source", "synthetic")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--sink" in err and "Traceback" not in err


def test_help_explains_the_options() -> None:
    proc = console("run", "--help")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    for words in (
        "--source",
        "webcam:N",
        "--sink",
        "--strength",
        "--guidance",
        "--frames",
        "random:sd-turbo",
    ):
        assert words in out


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT delivery differs on Windows")
def test_ctrl_c_finalizes_the_output(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "interrupted.mp4"
    proc = console(
        "run",
        "--source",
        "synthetic",
        "--sink",
        str(out),
        "--model",
        "tiny",
        "--width",
        "128",
        "--height",
        "128",
        "--steps",
        "1",
    )
    deadline = time.monotonic() + 120
    seen = ""
    assert proc.stderr is not None
    while time.monotonic() < deadline:  # wait for the first status line: frames are flowing
        line = proc.stderr.readline()
        seen += line
        if line.startswith("frames ") or not line:
            break
    assert "frames " in seen, seen
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    frames = read_video(out)
    assert len(frames) >= 5 and frames[0].shape == (128, 128, 3)


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--max-sessions", "0"], "--max-sessions must be at least 1"),
        (["--port", "70000"], "--port must be from 1 to 65535"),
        (["--idle-timeout", "0"], "--idle-timeout must be > 0"),
        (["--token", " "], "--token must not be empty"),
        (["--ice-server", "http://example"], "ice server must look like"),
        (["--strength", "3"], "strength must be in (0, 1]"),
    ],
)
def test_serve_bad_arguments(extra: list[str], words: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["serve", "--model", "tiny", *extra]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("stream: error: ") and words in line


def test_serve_starts_answers_health_and_stops(tiny_model_dir: Path) -> None:
    import json
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = console("serve", "--model", "tiny", "--width", "128", "--height", "128", "--port", str(port))
    try:
        deadline = time.monotonic() + 120
        health = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    health = json.load(r)
                    break
            except OSError:
                time.sleep(0.3)
        assert health is not None, proc.stderr.read() if proc.stderr else ""
        assert health["status"] == "ok" and health["placeholder"] is True and health["sessions"] == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert b"<html" in r.read().lower()
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert "Traceback" not in err and f"127.0.0.1:{port}" in err


def test_bench_prints_a_table_json_and_a_plot(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    plot = tmp_path / "latency.png"
    args = ["--model", "tiny", "--width", "64", "--height", "64", "--steps", "3", "--guidance", "2"]
    assert main(["bench", *args, "--frames", "8", "--warmup", "2", "-q", "--json", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["benchmark"] == "latency" and result["frames"] == 8 and result["placeholder"] is True
    assert result["nan_frames"] == 0 and result["cuda_graphs"] is False and result["compile"] == "off"
    stages = result["latency_ms"]
    assert {"preprocess", "encode", "unet_1", "unet_2", "unet_3", "denoise", "decode", "frame"} <= set(stages)
    assert all(stages[s]["p50"] > 0 for s in stages)
    assert stages["unet_1"]["p50"] < stages["denoise"]["p95"] < stages["frame"]["p99"] + 1  # parts of a frame
    assert 0 < result["model_forward_share"] < 1 and result["fps"] > 0
    assert any(line.startswith("  unet_3") for line in out) and "random weights" in "\n".join(out)
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_bench_sessions_compares_batching_in_one_run(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["--model", "tiny", "--width", "64", "--height", "64", "--steps", "3", "--guidance", "2"]
    assert main(["bench", *args, "--sessions", "1,3", "--frames", "2", "--warmup", "1", "-q"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    rows = {(r["batching"], r["sessions"]): r for r in result["rows"]}
    assert set(rows) == {(True, 1), (True, 3), (False, 1), (False, 3)}
    assert rows[(True, 3)]["unet_calls_per_round"] == 3  # one call per step for all three sessions
    assert rows[(False, 3)]["unet_calls_per_round"] == 9
    assert all(r["aggregate_fps"] > 0 and r["latency_p95_ms"] > 0 for r in rows.values())
    assert "UNet calls/round" in out[0] and len(out) == 6


@pytest.mark.parametrize(
    "extra", [["--sessions", "0"], ["--sessions", "two"], ["--sessions", "2", "--batching", "maybe"]]
)
def test_bench_sessions_bad_arguments(extra: list[str], capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--model", "tiny", *extra]) == 2
    err = capsys.readouterr().err
    assert "--sessions" in err or "--batching" in err


def test_bench_script_always_ends_with_json(tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from benchmarks.latency import main as latency_main

    args = [
        "--model",
        "tiny",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "1",
        "--frames",
        "3",
        "--warmup",
        "1",
    ]
    assert latency_main([*args, "--motion", "static", "-q"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 1 and "static" in result["clip"] and "unet_2" not in result["latency_ms"]


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--frames", "0"], "--frames must be at least 1"),
        (["--warmup", "-1"], "--warmup must be 0 or more"),
        (["--photo", "cat"], "photo must be one of"),
        (["--plot", "/nonexistent/dir/x.png"], "does not exist"),
        (["--steps", "9"], "steps must be"),
    ],
)
def test_bench_bad_arguments(extra: list[str], words: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--model", "tiny", "--width", "64", "--height", "64", "-q", *extra]) == 2
    assert words in capsys.readouterr().err


def test_a_size_the_model_cannot_take_is_refused_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The built-in model's real rule (multiples of 16), with the nearest sizes, before any loading."""

    def no_loading(*args: object) -> None:
        raise AssertionError("the model was loaded before the size was checked")

    monkeypatch.setattr("stream.cli.load_model", no_loading)
    monkeypatch.setattr("stream.serve.load_model", no_loading)
    out = str(tmp_path / "o.mp4")
    for command in (["run", "--source", "synthetic", "--sink", out], ["serve", "--port", "1"], ["bench"]):
        assert main([*command, "--model", "tiny", "--width", "520"]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line == (
            "stream: error: --width 520 does not fit the built-in tiny model (sizes must be multiples of 16); "
            "nearest: 512 or 528"
        ), command


def test_a_typo_gets_the_subcommands_usage_and_a_suggestion() -> None:
    """As typed in a terminal: `stream run ... --promt 'a cat'`, `stream serv`."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stream",
            "run",
            "--source",
            "synthetic",
            "--sink",
            "o.mp4",
            "--promt",
            "a cat",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("usage: stream run "), proc.stderr  # the subcommand's usage, not stream's
    assert proc.stderr.strip().splitlines()[-1] == (
        "stream run: error: unrecognized arguments: --promt a cat; did you mean --prompt?"
    )
    for argv, words in [
        (["serv"], "invalid choice: 'serv'"),
        (["serve", "--adaptive", "of"], "did you mean off?"),
        (["bench", "--frame", "3", "--motoin", "pan"], "did you mean --motion?"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "stream", *argv], capture_output=True, text=True, timeout=120
        )
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and words in last, (argv, proc.stderr)
    assert last.endswith("did you mean --motion?") and "--frame" not in last.split(";")[0].split(": ")[-1]


def test_help_shows_every_default() -> None:
    import argparse

    from stream.cli import build_parser

    parser = build_parser()
    for name, command in parser.commands.items():  # type: ignore[attr-defined]
        formatter = command.formatter_class(prog=name)
        for action in command._actions:
            if action.required or isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction)):
                continue
            text = formatter._get_help_string(action) or ""
            assert "default" in text, f"stream {name} {action.option_strings}: {text!r}"
    proc = console("serve", "--help")
    out, _ = proc.communicate(timeout=60)
    text = " ".join(out.split())
    for words in (
        "(default: 8080)",
        "(default: 127.0.0.1)",
        "(default: 4)",
        "(default: 24.0)",
        "(default: auto)",
        "16 for the built-in tiny model",
        "on a CPU, the largest offered size that holds --target-fps",
    ):
        assert words in text, words
