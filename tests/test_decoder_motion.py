"""benchmarks/decoder_motion.py: its motions, latent flows and decoder, and a quick run on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from benchmarks import decoder_motion as bench
from benchmarks.common import UsageError
from stream import temporal
from stream.clips import photo_clip
from stream.config import StreamConfig
from stream.denoiser import StreamDenoiser
from stream.models import load_model

QUICK = ["--device", "cpu", "--width", "128", "--height", "128", "--iters", "20"]


def test_motions_parse_with_the_latent_pixel_as_cell() -> None:
    assert bench.margin_px((256, 256), 16) == 32 and bench.margin_px((64, 96), 16) == 16
    motions = bench.parse_motions("pan:2, pan:cell,zoom:0.01", cell=16, most_pan=32)
    assert [(m.kind, m.amount) for m in motions] == [("pan", 2.0), ("pan", 16.0), ("zoom", 0.01)]
    assert [m.label for m in motions] == ["pan 2 px", "pan 16 px", "zoom 1%"]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("spin:3", ("spin:3", "pan:PX")),
        ("pan", ("pan:PX",)),
        ("pan:x", ("'pan:x'", "number")),
        ("pan:0", ("out of range", "(0, 32]")),
        ("pan:33", ("out of range", "the margin")),
        ("zoom:0.9", ("out of range", "(0, 0.5]")),
    ],
)
def test_bad_motions_say_what_is_wrong(text: str, words: tuple[str, ...]) -> None:
    with pytest.raises(UsageError) as caught:
        bench.parse_motions(text, cell=16, most_pan=32)
    for word in words:
        assert word in str(caught.value)


def test_latent_flow_of_a_pan_and_a_zoom() -> None:
    pan = bench.Motion("pan", 8.0)
    flow = bench.latent_flow(pan.matrix((64, 64)), (4, 4), cell=16)
    assert flow.shape == (4, 4, 2)
    assert torch.allclose(flow[..., 0], torch.full((4, 4), 0.5)) and torch.all(flow[..., 1] == 0)
    zoom = bench.Motion("zoom", 0.1)
    flow = bench.latent_flow(zoom.matrix((64, 64)), (4, 4), cell=16)
    # magnified about the centre: each latent pixel's content came from nearer the centre
    centres = torch.arange(4, dtype=torch.float32) * 16 + 7.5 - 31.5  # from the canvas centre, px
    assert torch.allclose(flow[0, :, 0] * 16, centres / 1.1 - centres, atol=1e-4)
    assert torch.allclose(flow[:, 0, 1] * 16, centres / 1.1 - centres, atol=1e-4)
    # a whole latent pixel's pan warps the latent by exactly one pixel
    z = torch.randn(1, 4, 4, 4)
    moved = temporal.warp(z, bench.latent_flow(bench.Motion("pan", 16.0).matrix((64, 64)), (4, 4), 16))
    assert torch.allclose(moved[..., :3], z[..., 1:], atol=1e-5)


def test_the_decoder_draws_the_streams_output_from_its_last_latent(tiny_model_dir: Path) -> None:
    config = StreamConfig(model=str(tiny_model_dir), width=64, height=64, latent_feedback=0.0)
    denoiser = StreamDenoiser(load_model(config), config)
    assert denoiser.last_latent is None
    frame = photo_clip("static", 1, (64, 64))[0]
    output = denoiser(frame)
    z = denoiser.last_latent
    assert z is not None and z.shape == (1, 4, 4, 4)
    drawn = bench.decoder(denoiser.engine)(z)[0].permute(1, 2, 0).detach().numpy() * 255.0
    assert np.abs(drawn - output.astype(np.float32)).max() <= 1.0


def test_quick_run_reports_each_motion_and_the_control_closes_the_gap(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = [*QUICK, "--model", str(tiny_model_dir), "--motions", "pan:2,pan:cell,zoom:0.02"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["benchmark"] == "decoder_motion" and report["command"].endswith(" ".join(argv))
    assert report["latent_px"] == 16 and report["margin_px"] == 32
    rows = {row["motion"]: row for row in report["motions"]}
    assert list(rows) == ["pan 2 px", "pan 16 px", "zoom 2%"]
    for label, row in rows.items():
        assert label in out
        assert row["unmoved"] > 0
        assert row["best_latent"] <= row["latent_warp"] * 1.05 + 0.5  # the fit starts from the warp
        assert row["closed_by_best"] == pytest.approx(1 - row["best_latent"] / row["unmoved"])
    control = rows["pan 16 px"]
    assert control["max_shift_latent_px"] == pytest.approx(1.0)
    # a convolutional decoder draws a whole latent pixel's move (all but the edges' influence)
    assert control["closed_by_warp"] > 0.6 and control["closed_by_best"] > 0.6
    assert rows["zoom 2%"]["max_shift_px"] == pytest.approx(0.02 * (63.5 - 32) * 2**0.5, abs=1e-6)


def test_the_measured_gap_is_the_moved_outputs() -> None:
    """`unmoved` is the output against itself moved, over the inside only."""
    output = (np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3)
    motion = bench.Motion("pan", 3.0)
    moved = cv2.warpAffine(output, motion.matrix((64, 64)), (64, 64), borderMode=cv2.BORDER_REFLECT)
    z = torch.zeros(1, 4, 4, 4)
    row = bench.measure_motion(
        lambda x: x.sum() * 0 + torch.zeros(1, 3, 64, 64), z, output, motion, 16, 16, 1, 0.05
    )
    expected = np.abs(output.astype(np.float32) - moved)[16:48, 16:48].mean()
    assert row["unmoved"] == pytest.approx(expected, rel=1e-5)
    assert row["latent_warp"] == pytest.approx(moved[16:48, 16:48].mean(), rel=1e-5)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--motions", "spin:1"], ("--motions", "spin:1")),
        (["--iters", "0"], ("--iters",)),
        (["--strength", "2"], ("strength",)),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    extra: list[str], words: tuple[str, ...], tiny_model_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    assert bench.main([*QUICK, "--model", str(tiny_model_dir), *extra]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.strip().splitlines() if line.strip() and "WARNING" not in line]
    assert len(lines) == 1 and "error" in lines[0], captured.err
    for word in words:
        assert word in lines[0]
    assert captured.out == ""


def test_help_explains_the_measure(capsys: pytest.CaptureFixture) -> None:
    assert bench.main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("--motions", "best latent", "python -m benchmarks.decoder_motion"):
        assert word in out


def test_vae_flag_swaps_the_autoencoder(tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """`--vae tiny` puts a TAESD-shaped autoencoder (a latent pixel of 8 px) under the built-in model."""
    argv = [*QUICK, "--model", "tiny", "--vae", "tiny", "--motions", "pan:cell", "--iters", "2"]
    assert bench.main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["latent_px"] == 8 and report["motions"][0]["amount"] == 8.0
    assert bench.main([*QUICK, "--model", str(tiny_model_dir), "--vae", "/no/such/vae"]) == 2
    assert "could not load vae" in capsys.readouterr().err
