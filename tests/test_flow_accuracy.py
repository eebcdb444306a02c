"""benchmarks/flow_accuracy.py: its known motions, and the stream's flow against DIS's ultrafast preset."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from benchmarks import flow_accuracy as bench
from stream import flow
from stream.clips import load_photo


def test_the_true_flow_is_what_the_frames_show() -> None:
    # Warping the first frame along the true flow gives the second, up to resampling (1-2 on 0-255),
    # and better than along a flow a tenth of a pixel off, or none.
    xs, ys = np.meshgrid(np.arange(128, dtype=np.float32), np.arange(128, dtype=np.float32))
    for motion in bench.MOTIONS:
        first, second, truth = bench.motion_pair(load_photo("coffee"), 128, motion)

        def error(f: np.ndarray, first: np.ndarray = first, second: np.ndarray = second) -> float:
            back = cv2.remap(first.astype(np.float32), xs + f[..., 0], ys + f[..., 1], cv2.INTER_CUBIC)
            return float(np.abs(back[16:-16, 16:-16] - second[16:-16, 16:-16]).mean())

        assert error(truth) < 2.5, motion[0]
        assert error(truth) < min(error(truth + 0.1), error(truth - 0.1)) - 0.3, motion[0]
        assert error(truth) < 0.5 * error(0 * truth), motion[0]


def test_the_stream_flow_is_more_accurate_than_the_preset_alone(capsys: pytest.CaptureFixture) -> None:
    assert bench.main(["--photos", "coffee,rocket", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    errors = report["mean_error"]
    assert errors["stream"] < 0.8 * errors["ultrafast"] and errors["finer"] < 0.6 * errors["stream"]
    assert errors["finer"] < 0.15 and errors["medium"] < 0.15  # the medium preset checks the truth
    assert report["stream_dis"] == {"preset": "ultrafast", "refinement": flow.DIS_REFINEMENT}
    assert set(report["time"]) == {"ultrafast", "stream", "finer", "medium"}
    assert report["command"] == "python -m benchmarks.flow_accuracy --photos coffee,rocket --repeats 1"
    assert "zoom 1%" in out and "p95 ms" in out


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--side", "10"], ("--side", "32 to 1024")),
        (["--photos", "cat"], ("unknown cat", "coffee")),
        (["--repeats", "0"], ("--repeats",)),
        (["--threads", "0"], ("--threads",)),
        (["--side", "x"], ("--side",)),
    ],
)
def test_bad_input_is_one_line(
    argv: list[str], words: tuple[str, ...], capsys: pytest.CaptureFixture
) -> None:
    assert bench.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    for word in words:
        assert word in captured.err
