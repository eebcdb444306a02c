"""benchmarks/compare_diffusers.py and benchmarks/temporal.py, run in-process on the tiny model at 64x64."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from benchmarks import compare_diffusers
from benchmarks import temporal as temporal_bench
from stream.clips import photo_clip

QUICK = [
    "--model",
    "tiny",
    "--device",
    "cpu",
    "--width",
    "64",
    "--height",
    "64",
    "--frames",
    "6",
    "--warmup",
    "1",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def last_json(out: str) -> dict[str, Any]:
    lines = out.strip().splitlines()
    assert lines, "no output"
    return json.loads(lines[-1])


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


def assert_one_line_error(err: str, *words: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "error" in lines[0]
    for word in words:
        assert word in lines[0], lines[0]


# ---------------------------------------------------------------------- clips
def test_pan_clip_moves_by_a_known_step() -> None:
    clip = photo_clip("pan", 5, (48, 64), step=3)
    assert len(clip) == 5 and all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in clip)
    for a, b in zip(clip, clip[1:], strict=False):
        assert np.array_equal(b[:, :-3], a[:, 3:])  # the picture moves 3 px left a frame


def test_static_clip_has_camera_noise_of_sigma_2_and_zoom_magnifies() -> None:
    static = photo_clip("static", 4, (64, 64), seed=1)
    diff = static[1].astype(np.float32) - static[0].astype(np.float32)
    assert 2.0 < diff.std() < 3.6  # two independent sigma-2 noises: sqrt(8) ~ 2.8
    assert np.array_equal(photo_clip("static", 4, (64, 64), seed=1)[3], static[3])  # seeded
    zoom = photo_clip("zoom", 3, (64, 64), zoom_rate=0.05)
    assert not np.array_equal(zoom[0], zoom[2])
    # Zooming about the centre: the centre pixel stays (nearly) where it was.
    assert np.abs(zoom[0][31:33, 31:33].astype(int) - zoom[2][31:33, 31:33].astype(int)).mean() < 12


def test_clip_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="clip kind"):
        photo_clip("spin", 3, (64, 64))
    with pytest.raises(ValueError, match="photo must be one of"):
        photo_clip("pan", 3, (64, 64), photo="moon")
    with pytest.raises(ValueError, match="at least 1 frame"):
        photo_clip("pan", 0, (64, 64))


# ---------------------------------------------------------------------- compare_diffusers
def test_compare_diffusers_quick_run(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    png = tmp_path / "latency.png"
    argv = [*QUICK, "--steps", "2", "--guidance", "2", "--plot", str(png)]
    assert compare_diffusers.main(argv) == 0
    out = capsys.readouterr().out
    report = last_json(out)
    assert report["benchmark"] == "compare_diffusers"
    assert report["command"] == "python -m benchmarks.compare_diffusers " + " ".join(argv)
    for key in ("model", "device", "torch", "diffusers", "cpu", "ratio_p50", "unet_calls_per_frame"):
        assert key in report
    assert report["random_weights"] and "tiny" in report["model"] and report["cfg"]
    for name in ("stream", "pipeline", "pipeline_cached_prompt"):
        stats = report[name]
        for key in ("p50_ms", "p95_ms", "p99_ms", "fps"):
            assert math.isfinite(stats[key]) and stats[key] > 0, (name, key, stats)
        assert stats["p99_ms"] < 60_000  # milliseconds: a 64x64 tiny frame takes far less than a minute
    for ratio in report["ratio_p50"].values():
        assert math.isfinite(ratio) and ratio > 0
    # The pipeline ran exactly as many UNet calls (CFG batched) per frame as the stream: 2 steps.
    assert report["pipeline_num_inference_steps"] == 4  # int(4 * 0.5) = 2 of a 4-step DDIM grid
    assert report["unet_calls_per_frame"] == {"stream": 2, "pipeline": 2, "pipeline_cached_prompt": 2}
    assert report["same_unet_steps"] is True
    header = out.splitlines()[0]
    assert "random weights" in header and "only the numbers" in header
    assert "same number of UNet calls per frame: yes" in out
    assert "fake" not in out.lower()
    assert_png(png)


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--frames", "0"], ("--frames", "at least 1")),
        (["--warmup", "-1"], ("--warmup",)),
        (["--width", "60"], ("width",)),
        (["--model", "/no/such/model"], ("does not exist",)),
        (["--no-such-flag"], ("unrecognized",)),
    ],
)
def test_compare_diffusers_bad_input(
    extra: list[str], words: tuple[str, ...], capsys: pytest.CaptureFixture
) -> None:
    assert compare_diffusers.main([*QUICK, *extra]) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured.err, *words)
    assert captured.out == ""


def test_plot_without_matplotlib_says_how_to_install(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    for bench in (compare_diffusers, temporal_bench):
        assert bench.main([*QUICK, "--plot", str(tmp_path / "x.png")]) == 2
        assert_one_line_error(capsys.readouterr().err, "pip install matplotlib")


# ---------------------------------------------------------------------- temporal
def test_flow_follows_the_pan_and_explains_the_input_better_than_random_frames() -> None:
    clip = photo_clip("pan", 4, (64, 96), step=4)
    warps = temporal_bench.input_warps(clip)
    for warp in warps:
        shift = warp.map_x - np.arange(96, dtype=np.float32)[None, :]
        assert abs(float(np.median(shift[warp.valid])) - 4.0) < 0.5  # frame t-1 holds x at x + 4
        assert warp.valid.mean() > 0.7  # only the strip that entered on the right is masked
        assert not warp.valid[:, -2:].any()  # ...which warps from outside the previous frame
    floor = np.mean(temporal_bench.warp_errors(clip, warps))
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, f.shape, dtype=np.uint8) for f in clip]
    control = np.mean(temporal_bench.warp_errors(noise, warps))
    shuffled = np.mean(temporal_bench.warp_errors(clip[::-1], warps))  # right frames, wrong order
    assert floor < 3.0 < 20.0 < control
    assert floor < shuffled / 3


def test_temporal_quick_run(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    png, strip = tmp_path / "temporal.png", tmp_path / "strip.png"
    argv = [*QUICK, "--feedback", "0.6", "--clips", "pan,object", "--plot", str(png), "--strip", str(strip)]
    assert temporal_bench.main(argv) == 0
    out = capsys.readouterr().out
    report = last_json(out)
    assert report["benchmark"] == "temporal" and report["command"].endswith(" ".join(argv))
    for key in ("model", "device", "torch", "diffusers", "cpu", "clips", "time", "settings", "seed"):
        assert key in report
    assert report["feedback"] == 0.6 and list(report["clips"]) == ["pan", "object", "still"]
    settings = ["no_feedback", "in_place", "warped_feedback", "warped_noise", "both", "steps", "both_steps"]
    assert list(report["settings"]) == settings and list(report["time"]) == settings
    assert report["settings"]["in_place"]["feedback_warp"] is False
    assert report["settings"]["both"] == {"latent_feedback": 0.6, "feedback_warp": True, "noise": "warped"}
    assert report["settings"]["both_steps"]["feedback_at"] == "steps"
    for name, clip in report["clips"].items():
        for measure in ("warp_error", "change", "contrast"):
            assert set(clip[measure]) == {"input", *settings}
            assert all(math.isfinite(v) and v >= 0 for v in clip[measure].values()), (name, clip)
        assert all(v > 5 for v in clip["contrast"].values())  # a photo and the model's outputs: not flat
    pan = report["clips"]["pan"]
    assert pan["warp_per_contrast"]["both"] == pytest.approx(
        pan["warp_error"]["both"] / pan["contrast"]["both"], abs=1e-3
    )
    # the targets: each held setting, each check with its value, limit and verdict
    checks = report["targets"]["both_steps"]
    assert set(checks) == {"warp_error_pan", "warp_per_contrast_pan", "still_change", "added_pct"}
    assert checks["warp_error_pan"]["met"] == (checks["warp_error_pan"]["value"] <= 0.85)
    assert report["ratios"]["both"]["warp_error"]["pan"] == pytest.approx(
        pan["warp_error"]["both"] / pan["warp_error"]["no_feedback"], abs=1e-3
    )
    assert 0 <= report["clips"]["pan"]["masked_fraction"] < 0.5
    # `if stuck`: each frame against itself moved; the panned input moves, so standing still scores far worse
    assert "stuck" not in report["clips"]["still"] and set(pan["stuck"]) == {"input", *settings}
    assert pan["stuck"]["input"] > 5 * pan["warp_error"]["input"] + 5
    assert pan["warp_per_stuck"]["input"] < 0.2
    assert pan["warp_per_stuck"]["both"] == pytest.approx(
        pan["warp_error"]["both"] / pan["stuck"]["both"], abs=1e-3
    )
    assert "if stuck" in out
    assert 1.0 < report["clips"]["still"]["change"]["input"] < 3.5  # the camera noise (sigma 2)
    assert report["clips"]["pan"]["warp_error"]["input"] < 5.0  # the flow explains the panned input
    # A still scene: warped noise does not move, so it is exactly fixed noise.
    still = report["clips"]["still"]["change"]
    assert still["warped_noise"] == still["no_feedback"] and still["both"] == still["warped_feedback"]
    assert still["both_steps"] == still["steps"]
    assert (
        all(t["p50_ms"] > 0 for t in report["time"].values())
        and report["time"]["no_feedback"]["added_pct"] == 0
    )
    header = out.splitlines()[0]
    assert "random weights" in header and "fake" not in out.lower()
    assert "added to no feedback" in out
    assert_png(png)
    assert_png(strip)


def test_temporal_zoom_motion_strength_and_a_video_file(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 24, (80, 64))
    for frame in photo_clip("pan", 4, (64, 80), step=3):
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    argv = [*QUICK, "--frames", "3", "--warmup", "0", "--clips", "zoom", "--steps", "1"]
    argv += ["--clip", str(video), "--motion-strength", "0.4", "--image-feedback", "0.5"]
    assert temporal_bench.main(argv) == 0
    out = capsys.readouterr().out
    report = last_json(out)
    assert list(report["clips"]) == ["zoom", "file:clip.avi", "still"] and report["zoom_rate"] == 0.01
    assert report["settings"]["both_motion"]["motion_strength"] == 0.4
    assert report["settings"]["image"] == {
        "latent_feedback": 0.0,
        "image_feedback": 0.5,
        "feedback_warp": True,
    }
    assert report["settings"]["both_image"] == {**report["settings"]["both_steps"], "image_feedback": 0.5}
    for setting in ("both_motion", "image", "both_image"):
        assert math.isfinite(report["clips"]["file:clip.avi"]["warp_error"][setting])
    assert "image fb" in out and "steps+image" in out
    assert set(report["targets"]) == {"both", "both_steps"} and "both_image" in report["ratios"]
    assert "steps+image is not held to the targets" in out


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--frames", "1"], ("--frames", "at least 2")),
        (["--feedback", "0"], ("--feedback", "(0, 1)")),
        (["--feedback", "1.5"], ("--feedback",)),
        (["--clips", "spin"], ("--clips", "spin")),
        (["--clip", "/no/such/video.mp4"], ("--clip", "cannot read video")),
        (["--motion-strength", "1"], ("--motion-strength",)),
        (["--image-feedback", "-0.1"], ("--image-feedback",)),
        (["--strength", "2"], ("strength",)),
        (["--vae", "/no/such/vae"], ("could not load vae", "--vae auto")),
    ],
)
def test_temporal_bad_input(extra: list[str], words: tuple[str, ...], capsys: pytest.CaptureFixture) -> None:
    assert temporal_bench.main([*QUICK, *extra]) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured.err, *words)
    assert captured.out == ""


def test_help_explains_the_flags(capsys: pytest.CaptureFixture) -> None:
    for bench, words in (
        (compare_diffusers, ("--warmup", "python -m benchmarks.compare_diffusers")),
        (temporal_bench, ("--feedback", "python -m benchmarks.temporal")),
    ):
        assert bench.main(["--help"]) == 0
        out = capsys.readouterr().out
        for word in words:
            assert word in out


def test_stuck_error_is_a_frame_against_itself_moved() -> None:
    clip = photo_clip("pan", 3, (48, 64), step=4)
    warps = temporal_bench.input_warps(clip)
    stuck = temporal_bench.stuck_errors(clip, warps)
    assert stuck == [temporal_bench.warp_errors([f, f], [w])[0] for f, w in zip(clip[1:], warps, strict=True)]
    frozen = [clip[0]] * 3  # a picture that stays on the screen while the content moves
    assert temporal_bench.warp_errors(frozen, warps) == pytest.approx(
        temporal_bench.stuck_errors(frozen, warps), rel=1e-6
    )
    assert min(stuck) > 5 * max(temporal_bench.warp_errors(clip, warps))
