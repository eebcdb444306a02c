"""The GPU suite: every GPU measurement of the product in ONE command that fits in 8 minutes.

    python3 -m benchmarks.gpu_suite --out gpu-results                # on the GPU machine
    python -m benchmarks.gpu_suite --model tiny --device cpu --quick --out /tmp/rehearsal

Parts, in order, each with its own time budget (a part that fails or runs out of time is recorded
and the suite goes on):
- env: device name, driver, CUDA, torch, diffusers and Python versions, the command;
- pipeline:<model>: 512x512 fp16, from a uint8 frame in to a uint8 frame out; A (1 step, no CFG) and
  B (4 steps, CFG as one batched call); eager vs CUDA graphs vs graphs with channels_last weights:
  FPS, p50/p95/p99, first frame (capture), GPU memory peak, NaN frames (every output's canvas is
  checked), max difference from eager.
  `random:sd-turbo` (SD 2.1 UNet) with the TAESD-shaped autoencoder, `random:sd15` with its full
  AutoencoderKL (decoded in fp32: its config says force_upcast);
- sessions: 1-32 sessions batched (A) on one GPU: frames/s, per-session FPS, p95; the largest N that
  keeps every session at 24 FPS with p95 <= 40 ms;
- diffusers: StableDiffusionImg2ImgPipeline on the same model, steps and size: the FPS ratio;
- streamdiffusion: StreamDiffusion 0.1.1 itself in a subprocess (benchmarks/gpu/streamdiffusion_run.py);
- features: Stream Batch and residual CFG on sd-turbo B (CUDA graphs): FPS, p50/p95 of a call and UNet
  calls per frame of each (Stream Batch's output comes steps-1 frames after its input);
- temporal: following the motion on sd-turbo B: warp error, change and the warp error if stuck (each
  output against itself moved: under it, the output moved with the content better than a still
  picture would) on a 4 px/frame pan, a zoom and a still clip, and the time a frame, for no feedback,
  feedback in place, warped feedback and noise, the same at the denoising steps, image feedback alone,
  and with the latter (benchmarks/temporal.py's measures);
- compile: torch.compile (default) + CUDA graphs on A, with its compile time (CUDA only);
- pytest_slow: the GPU-marked tests (`pytest -m slow`), SDXL-Turbo and SD-Turbo + ControlNet among them.
Writes gpu_suite.json and gpu_suite.txt (the table) to --out, prints the table, then one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import command_line, photo_clip
from benchmarks.gpu import measure, report
from benchmarks.gpu.streamdiffusion_run import run_streamdiffusion

MODULE = "benchmarks.gpu_suite"
ROOT = Path(__file__).resolve().parent.parent  # the repository: the slow tests' paths are relative to it
TOTAL_S = 480.0  # 8 minutes for everything
# Seconds per part (caps: a part that ends early leaves its time to the next ones, up to 1.5x their own).
BUDGETS = {
    "env": 10.0,
    "pipeline:sd-turbo": 75.0,
    "sessions": 70.0,
    "diffusers": 40.0,
    "streamdiffusion": 70.0,
    "pipeline:sd15": 50.0,
    "features": 30.0,
    "temporal": 30.0,
    "compile": 55.0,
    "pytest_slow": 50.0,
}
MODELS = {"sd-turbo": ("random:sd-turbo", "tiny"), "sd15": ("random:sd15", "auto")}  # model, vae
SLOW_TESTS = [
    "tests/test_gpu.py",
    "tests/test_graphs.py",
    "tests/test_frame_path.py",
    "tests/test_gpu_adapters.py",
]
# the temporal part's settings (benchmarks/temporal.py's)
TEMPORAL = ("no_feedback", "in_place", "both", "both_steps", "image", "both_image")
TEMPORAL_FEEDBACK = 0.5  # the latent and image feedback of its settings
# the features part's variants of B: StreamConfig changes
FEATURES = {
    "cfg full": {},
    "cfg self": {"cfg_mode": "self"},
    "stream batch, cfg full": {"stream_batch": True},
    "stream batch, cfg self": {"stream_batch": True, "cfg_mode": "self"},
}


class PartTimeout(Exception):
    """A part ran past its budget (raised by the alarm in the main thread)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="folder for gpu_suite.json and gpu_suite.txt")
    parser.add_argument(
        "--model", help="run every part on this one model instead (the rehearsal uses `tiny`)", default=None
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu")
    parser.add_argument("--size", type=int, default=None, help="square model size (default 512; tiny: 64)")
    parser.add_argument("--quick", action="store_true", help="a few frames per variant: the CPU rehearsal")
    parser.add_argument("--sessions", default="1,4,8,16,24,32", help="session counts for the sessions part")
    parser.add_argument(
        "--parts", default=",".join(BUDGETS), help=f"comma-separated subset of: {', '.join(BUDGETS)}"
    )
    parser.add_argument(
        "--streamdiffusion-site",
        default=".sdsite",
        help="folder where StreamDiffusion 0.1.1 and the packages it pins are installed "
        "(benchmarks/gpu/README.md)",
    )
    parser.add_argument("--total-s", type=float, default=TOTAL_S, help="time for the whole suite, seconds")
    return parser


class Suite:
    def __init__(self, args: argparse.Namespace, command: str) -> None:
        from stream.devices import resolve_device

        self.args = args
        self.device = resolve_device(args.device)
        self.cuda = self.device.type == "cuda"
        self.quick = args.quick
        self.size = args.size or (64 if args.model == "tiny" else 512)
        self.frames, self.warmup = (3, 1) if self.quick else (200, 10)
        self.clip = photo_clip("pan", 16, (self.size, self.size), step=4)
        self.record: dict[str, Any] = {"suite": "gpu", "quick": self.quick, "size": self.size, "parts": {}}
        self.record["environment"] = {"device": str(self.device), "command": command}
        # mode -> our best FPS on sd-turbo, for StreamDiffusion's ratio
        self.stream_fps: dict[str, float] = {}
        self.components: dict[str, Any] = {}
        self.eager_a: dict[str, Any] | None = None  # sd-turbo's eager A outputs, for compile's comparison
        self.start = time.perf_counter()

    # ------------------------------------------------------------------ running parts
    def run(self, names: Sequence[str]) -> dict[str, Any]:
        parts: dict[str, Callable[[measure.Deadline], dict[str, Any]]] = {
            "env": self.env,
            "pipeline:sd-turbo": lambda d: self.pipeline("sd-turbo", d),
            "sessions": self.sessions,
            "diffusers": self.diffusers,
            "streamdiffusion": self.streamdiffusion,
            "pipeline:sd15": lambda d: self.pipeline("sd15", d),
            "features": self.features,
            "temporal": self.temporal,
            "compile": self.compile,
            "pytest_slow": self.pytest_slow,
        }
        for index, name in enumerate(names):
            later = sum(BUDGETS[n] for n in names[index + 1 :])
            left = self.args.total_s - (time.perf_counter() - self.start)
            budget = max(1.0, min(left - later, 1.5 * BUDGETS[name]))
            self.record["parts"][name] = self._run_part(name, parts[name], budget)
            sys.stderr.write(f"{name}: {self.record['parts'][name]['status']}\n")
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
        self.record["seconds"] = round(time.perf_counter() - self.start, 1)
        self.record["summary"] = report.summary_lines(self.record)
        self.record["targets"] = report.targets(self.record)
        return self.record

    def _run_part(
        self, name: str, fn: Callable[[measure.Deadline], dict[str, Any]], budget: float
    ) -> dict[str, Any]:
        begun = time.perf_counter()

        def alarm(*_: Any) -> None:
            raise PartTimeout(f"ran past its {budget:.0f} s budget")

        previous = signal.signal(signal.SIGALRM, alarm)
        outer, _ = signal.getitimer(signal.ITIMER_REAL)  # a caller's own alarm (pytest-timeout), put back
        signal.setitimer(signal.ITIMER_REAL, budget + 15.0)  # loops stop at the budget; this is the backstop
        try:
            result = {"status": "ok", **fn(measure.Deadline(budget))}
        except Exception as exc:  # a failing part is recorded and the suite goes on
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            result = {"status": "failed", "error": f"{type(exc).__name__}: {text}"}
            result["traceback"] = traceback.format_exc(limit=4)[-2000:]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            if outer:
                signal.setitimer(signal.ITIMER_REAL, max(0.001, outer - (time.perf_counter() - begun)))
        result.update({"budget_s": round(budget, 1), "seconds": round(time.perf_counter() - begun, 1)})
        return result

    def _config(self, key: str, mode: measure.Mode, **changes: Any) -> Any:
        from stream.config import StreamConfig

        model, vae = (self.args.model, "auto") if self.args.model else MODELS[key]
        return StreamConfig(
            model=model, vae=vae, device=str(self.device), width=self.size, height=self.size,
            steps=mode.steps, guidance_scale=mode.guidance, strength=mode.strength,
            prompt="an oil painting of a cup of coffee", **changes,
        )  # fmt: skip

    def _load(self, key: str) -> Any:
        """A model's components, loaded once for all parts (each part makes engines of its own)."""
        from stream.models import load_model

        if key not in self.components:
            self.components[key] = load_model(self._config(key, measure.MODES[0]))
        return self.components[key]

    # ------------------------------------------------------------------ the parts
    def env(self, deadline: measure.Deadline) -> dict[str, Any]:
        self.record["environment"] = report.environment(self.device, self.record["environment"]["command"])
        return {}

    def pipeline(self, key: str, deadline: measure.Deadline) -> dict[str, Any]:
        components = self._load(key)
        variants = ("eager", "graphs", "channels_last")
        modes: dict[str, Any] = {}
        for m, mode in enumerate(measure.MODES):
            config = self._config(key, mode)
            runs: dict[str, Any] = {}
            for v, variant in enumerate(variants):
                share = measure.Deadline(deadline.left() / ((len(measure.MODES) - m) * len(variants) - v))
                engine, note = measure.make_engine(components, config, variant)
                runs[variant] = measure.measure_stream(
                    engine, config, self.clip, self.warmup, self.frames, share
                )
                runs[variant]["note"] = note
                del engine
                measure.contiguous(components)
            for variant in variants[1:]:
                runs[variant]["vs_eager"] = measure.compare_outputs(runs["eager"], runs[variant])
            modes[mode.name] = {
                name: {k: r[k] for k in ("summary", "note", "vs_eager") if k in r} for name, r in runs.items()
            }
            if key == "sd-turbo":
                self.stream_fps[mode.name] = max(r["summary"]["fps"] for r in runs.values())
                self.eager_a = runs["eager"] if mode.name == "A" else self.eager_a
        return {
            "model": f"{MODELS[key][0]} (vae {MODELS[key][1]})" if not self.args.model else self.args.model,
            "modes": modes,
        }

    def sessions(self, deadline: measure.Deadline) -> dict[str, Any]:
        counts = [int(n) for n in self.args.sessions.split(",")]
        if self.quick:
            counts = counts[:2]
        config = self._config("sd-turbo", measure.MODES[0])
        engine, note = measure.make_engine(self._load("sd-turbo"), config, "graphs")
        rounds, warmup = (2, 1) if self.quick else (30, 3)
        result = measure.measure_sessions(engine, config, counts, self.clip, warmup, rounds, deadline)
        return {"model": config.model, "note": note, **result}

    def diffusers(self, deadline: measure.Deadline) -> dict[str, Any]:
        # the pipeline's own strength grid (timesteps="diffusers"): the same UNet calls as the stream
        frames = 2 if self.quick else 30
        modes = {}
        for m, mode in enumerate(measure.MODES):
            config = self._config("sd-turbo", mode, timesteps="diffusers")
            share = measure.Deadline(deadline.left() / (len(measure.MODES) - m))
            modes[mode.name] = measure.measure_diffusers(
                self._load("sd-turbo"), config, self.clip, 1 if self.quick else 3, frames, share
            )
        return {"model": self._config("sd-turbo", measure.MODES[0]).model, "modes": modes}

    def streamdiffusion(self, deadline: measure.Deadline) -> dict[str, Any]:
        components = self._load("sd-turbo")
        modes = {m.name: m.guidance for m in measure.MODES}
        frames, warmup = (2, 1) if self.quick else (100, 10)
        site = Path(self.args.streamdiffusion_site).resolve()
        result = run_streamdiffusion(
            components, self.size, modes, site, max(5.0, deadline.left()), frames, warmup
        )
        for name, fps in self.stream_fps.items():
            if isinstance(result.get("modes", {}).get(name), dict):
                result["modes"][name]["stream_fps"] = fps
        return result  # its status: ok, not run (not installed), failed or timed out

    def features(self, deadline: measure.Deadline) -> dict[str, Any]:
        """Stream Batch and residual CFG on sd-turbo B: one engine each, the same clip and frames."""
        components = self._load("sd-turbo")
        mode = measure.MODES[1]
        warmup = max(self.warmup, mode.steps)  # Stream Batch's first outputs come k-1 frames late
        runs: dict[str, Any] = {}
        for v, (name, changes) in enumerate(FEATURES.items()):
            config = self._config("sd-turbo", mode, **changes)
            share = measure.Deadline(deadline.left() / (len(FEATURES) - v))
            engine, note = measure.make_engine(components, config, "graphs")
            calls = engine.calls
            run = measure.measure_stream(engine, config, self.clip, warmup, self.frames, share)
            processed = warmup + run["summary"]["frames"]
            per_frame = round((engine.calls - calls) / processed, 2)
            runs[name] = {**run["summary"], "unet_calls_per_frame": per_frame, "note": note}
            del engine
        return {"model": self._config("sd-turbo", mode).model, "mode": mode.name, "variants": runs}

    def temporal(self, deadline: measure.Deadline) -> dict[str, Any]:
        """Following the motion on sd-turbo B, eager, the settings interleaved frame by frame."""
        from benchmarks import temporal as bench
        from benchmarks.temporal_measures import mean_of
        from stream.denoiser import StreamDenoiser

        components = self._load("sd-turbo")
        mode = measure.MODES[1]
        frames = 4 if self.quick else 16  # six settings, three clips: about 300 frames in the 30 s
        size = (self.size, self.size)
        clips = {kind: photo_clip(kind, frames, size, step=4) for kind in ("pan", "zoom")}
        clips[bench.STILL] = photo_clip("static", frames, size)
        denoisers = {
            s: StreamDenoiser(
                components,
                self._config(
                    "sd-turbo",
                    mode,
                    **bench.setting_changes(s, TEMPORAL_FEEDBACK, image_feedback=TEMPORAL_FEEDBACK),
                ),
            )
            for s in TEMPORAL
        }
        curves, times, _ = bench.measure_clips(denoisers, clips, 1 if self.quick else 3)
        result: dict[str, Any] = {"model": self._config("sd-turbo", mode).model, "mode": mode.name}
        for name, measures in curves.items():
            kept = ("change",) if name == bench.STILL else ("warp_error", "change", "stuck")
            result[name] = {m: {k: round(mean_of(v), 3) for k, v in measures[m].items()} for m in kept}
        p50 = {s: float(np.percentile(t, 50)) for s, t in times.items()}
        result["p50_ms"] = {s: round(v, 2) for s, v in p50.items()}
        # from the unrounded p50s: a rounded one against an unrounded one is off by up to 0.5 % at 1 ms
        result["added_pct"] = {s: round(100.0 * (v / p50["no_feedback"] - 1.0), 1) for s, v in p50.items()}
        return result

    def compile(self, deadline: measure.Deadline) -> dict[str, Any]:
        if not self.cuda:
            return {"skipped": "measured on CUDA only: on a CPU its inductor build alone takes minutes"}
        components = self._load("sd-turbo")
        config = self._config("sd-turbo", measure.MODES[0])
        engine, note = measure.make_engine(components, config, "compile")
        run = measure.measure_stream(engine, config, self.clip, self.warmup, self.frames, deadline)
        result = {"model": config.model, "mode": "A", "note": note, **run["summary"]}
        if self.eager_a is not None:  # the same clip, settings and warm-up as pipeline:sd-turbo's eager A
            result["vs_eager"] = measure.compare_outputs(self.eager_a, run)
        return result

    def pytest_slow(self, deadline: measure.Deadline) -> dict[str, Any]:
        command = [sys.executable, "-m", "pytest", "-m", "slow", "-q", "-p", "no:cacheprovider", *SLOW_TESTS]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=max(5.0, deadline.left()), cwd=ROOT
            )
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError("pytest -m slow ran past the part's budget") from exc
        lines = done.stdout.strip().splitlines()
        result = {
            "command": " ".join(command[1:]),
            "exit": done.returncode,
            "result": lines[-1] if lines else "",
            "failed": [line for line in lines if line.startswith(("FAILED", "ERROR"))][:20],
        }
        if done.returncode not in (0, 5):  # 5: nothing collected
            raise RuntimeError(f"pytest -m slow: {result['result'] or done.stderr.strip()[-300:]}")
        return result


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.parts.split(",") if n.strip()]
    unknown = [n for n in names if n not in BUDGETS]
    if unknown:
        print(
            f"gpu_suite: error: unknown part(s) {', '.join(unknown)}; known: {', '.join(BUDGETS)}",
            file=sys.stderr,
        )
        return 2
    try:
        counts = [int(n) for n in args.sessions.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1 or max(counts) > 64:
        got = f"got {args.sessions!r}"
        print(
            f"gpu_suite: error: --sessions takes counts from 1 to 64 separated by commas, {got}",
            file=sys.stderr,
        )
        return 2
    try:
        suite = Suite(args, command_line(MODULE, argv))
    except ValueError as exc:  # a device that is not there
        print(f"gpu_suite: error: {exc}", file=sys.stderr)
        return 2
    record = suite.run(names)
    json_path, table_path = report.write(Path(args.out), record)
    print(table_path.read_text(), end="")
    failed = [n for n, p in record["parts"].items() if p["status"] != "ok"]
    last = {"suite": "gpu", "out": str(json_path), "seconds": record["seconds"], "not_ok_parts": failed}
    print(json.dumps({**last, "summary": record["summary"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
