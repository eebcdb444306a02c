"""The GPU suite rehearsed on the CPU (`--model tiny --device cpu --quick`), so that its first GPU run
does not fail on a typo: every part runs, the record and the table are written, the last line is JSON,
and a failing part is recorded while the suite goes on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import gpu_suite
from benchmarks.gpu import measure

REHEARSAL = ["--model", "tiny", "--device", "cpu", "--quick", "--sessions", "1,3"]


def test_the_whole_suite_rehearses_on_the_cpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_model_dir: Path
) -> None:
    site = tmp_path / "no-site"
    code = gpu_suite.main([*REHEARSAL, "--out", str(tmp_path), "--streamdiffusion-site", str(site)])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    last = json.loads(out[-1])
    record = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert last["out"] == str(tmp_path / "gpu_suite.json") and last["summary"] == record["summary"]
    parts = record["parts"]
    assert list(parts) == list(gpu_suite.BUDGETS)
    assert record["environment"]["torch"] and record["environment"]["diffusers"]
    assert "--quick" in record["environment"]["command"]
    # every part ran; StreamDiffusion is not installed here, and says where it was looked for
    assert {n for n, p in parts.items() if p["status"] != "ok"} == {"streamdiffusion"}
    assert parts["streamdiffusion"]["status"] == "not run" and str(site) in parts["streamdiffusion"]["reason"]
    assert last["not_ok_parts"] == ["streamdiffusion"]
    for name in ("pipeline:sd-turbo", "pipeline:sd15"):
        modes = parts[name]["modes"]
        assert set(modes) == {"A", "B"}
        for variants in modes.values():
            assert set(variants) == {"eager", "graphs", "channels_last"}
            for v in variants.values():
                s = v["summary"]
                assert s["frames"] >= 1 and s["fps"] > 0 and s["p50_ms"] <= s["p99_ms"]
                assert s["nan_frames"] == 0
            # the bucket padding (eager on a CPU) gives the eager frames
            assert variants["graphs"]["vs_eager"]["frames_compared"] >= 1
            assert variants["graphs"]["vs_eager"]["max_diff_uint8"] <= 1
            assert variants["channels_last"]["vs_eager"]["max_diff_uint8"] <= 2
    rows = parts["sessions"]["rows"]
    assert [r["sessions"] for r in rows] == [1, 3] and all(r["aggregate_fps"] > 0 for r in rows)
    for mode in ("A", "B"):
        assert parts["diffusers"]["modes"][mode]["speedup_fps"] > 0
        assert parts["diffusers"]["modes"][mode]["frames"] >= 1
    features = parts["features"]["variants"]  # Stream Batch: one UNet call a frame; without it, the steps
    assert set(features) == set(gpu_suite.FEATURES)
    assert features["stream batch, cfg full"]["unet_calls_per_frame"] == 1.0
    assert features["cfg full"]["unet_calls_per_frame"] == 4.0
    temporal = parts["temporal"]  # following the motion: every setting measured on every clip
    for clip in ("pan", "zoom"):
        assert set(temporal[clip]["warp_error"]) == {"input", *gpu_suite.TEMPORAL}
        assert all(v >= 0 for v in temporal[clip]["warp_error"].values())
        assert set(temporal[clip]["stuck"]) == {"input", *gpu_suite.TEMPORAL}
    assert set(temporal["still"]["change"]) == {"input", *gpu_suite.TEMPORAL}
    assert set(temporal["added_pct"]) == set(gpu_suite.TEMPORAL) and temporal["added_pct"]["no_feedback"] == 0
    assert "both_steps" in record["summary"]["temporal pan warp error of no feedback"]
    assert "input 0." in record["summary"]["temporal pan warp/stuck (under 1: better than a still picture)"]
    targets = record["targets"]
    assert targets[">= 1.5x StreamDiffusion"] is None  # not run here: not measured, never "missed"
    assert set(targets["A >= 250 FPS, p50 <= 4 ms"]) == {"fps", "p50_ms", "holds"}
    assert targets[">= 20 sessions at 24 FPS, p95 <= 40 ms"]["sessions"] in (0, 1, 3)
    assert "CUDA only" in parts["compile"]["skipped"]
    assert parts["pytest_slow"]["exit"] in (0, 5) and "-m slow" in parts["pytest_slow"]["command"]
    table = (tmp_path / "gpu_suite.txt").read_text()
    assert "sessions batched" in table and "pipeline:sd15" in table and "StreamDiffusion" in table
    assert "targets (H200, 512x512):" in table and "not measured" in table
    assert all(p["seconds"] <= p["budget_s"] + 15 for p in parts.values())


def test_a_failing_part_is_recorded_and_the_suite_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> None:
    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("out of memory\nsecond line")

    monkeypatch.setattr(measure, "measure_sessions", broken)
    code = gpu_suite.main([*REHEARSAL, "--out", str(tmp_path), "--parts", "sessions,env"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    parts = json.loads((tmp_path / "gpu_suite.json").read_text())["parts"]
    assert code == 0 and last["not_ok_parts"] == ["sessions"]
    assert parts["sessions"]["error"] == "RuntimeError: out of memory" and parts["env"]["status"] == "ok"


def test_an_unknown_part_is_one_line_with_the_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gpu_suite.main([*REHEARSAL, "--out", str(tmp_path), "--parts", "sesions"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sesions" in err[0] and "sessions" in err[0]


def test_bad_session_counts_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_suite.main([*REHEARSAL, "--out", str(tmp_path), "--sessions", "1,x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sessions" in err[0] and "'1,x'" in err[0]


def test_targets_say_holds_missed_or_not_measured() -> None:
    from benchmarks.gpu import report

    def run(fps: float, p50: float, p99: float) -> dict[str, object]:
        return {"summary": {"fps": fps, "p50_ms": p50, "p95_ms": p99, "p99_ms": p99}}

    record = {
        "parts": {
            "pipeline:sd-turbo": {
                "modes": {
                    "A": {"eager": run(200.0, 5.0, 6.0), "graphs": run(300.0, 3.3, 3.9)},
                    "B": {"eager": run(40.0, 25.0, 26.0), "graphs": run(70.0, 14.0, 35.0)},
                }
            },
            "sessions": {"max_sessions_at_target": 24},
            "streamdiffusion": {"status": "failed", "error": "ImportError: x"},
            "diffusers": {"modes": {"A": {"speedup_fps": 12.0}, "B": {"speedup_fps": 9.0}}},
        }
    }
    t = report.targets(record)
    assert t["A >= 250 FPS, p50 <= 4 ms"] == {"fps": 300.0, "p50_ms": 3.3, "holds": True}
    b = t["B >= 60 FPS, p99 <= 30 ms"]
    assert b["fps"] == 70.0 and not b["holds"] and b["share_of_limit"] == round(70.0 / report.B_LIMIT_FPS, 3)
    assert t[">= 20 sessions at 24 FPS, p95 <= 40 ms"] == {"sessions": 24, "holds": True}
    assert t[">= 1.5x StreamDiffusion"] is None
    assert t[">= 10x diffusers img2img"] == {"ratio": {"A": 12.0, "B": 9.0}, "holds": False}
    assert "StreamDiffusion" in report.summary_lines(record)
