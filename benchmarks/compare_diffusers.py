"""Per-frame latency of StreamDenoiser against diffusers' StableDiffusionImg2ImgPipeline, in one run.

Both run over the SAME loaded components (the same UNet, VAE, text encoder and tokenizer objects, on
the same device and dtype; in float16 an AutoencoderKL whose config says force_upcast runs in
float32 in the stream, and the pipeline gets a copy in float16, as diffusers' img2img runs it), the
same model, size, steps, strength and guidance, on the same frames (a window panning over a real
photo). The pipeline uses `DDIMScheduler.from_config(<model's config>)` and `num_inference_steps =
inference_steps_for(steps, strength)`, the DDIM grid whose last `steps` timesteps img2img keeps at
that strength, so both make the same number of UNet calls per frame; a forward hook on the UNet
counts them and the run fails (exit 1) if they differ.

Three variants, called frame after frame in turn (so drifts of the machine hit all three alike), each
timed from a uint8 frame in to a uint8 frame out, as a user would call it per frame:
- stream: `StreamDenoiser(frame)` (prompt encoded once, fixed noise, precomputed schedule);
- pipeline: `pipe(prompt=..., image=PIL frame, output_type="np")`, the prompt encoded every call;
- pipeline + cached prompt: the same with `prompt_embeds` / `negative_prompt_embeds` computed once,
  the fairest comparison of the per-frame work.
On the CPU the pipeline runs with the convolution backend StreamDenoiser picked for the model (oneDNN
or PyTorch's own, a process-wide switch), so that both use the same kernels.

Prints a table, then one JSON object as the last line. Example:

    python -m benchmarks.compare_diffusers --model tiny --width 256 --height 256 --frames 48
    python -m benchmarks.compare_diffusers --model random:sd-turbo --device cuda --steps 1 --strength 1
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    ArgumentParser,
    UsageError,
    add_common_arguments,
    check_plot_target,
    command_line,
    environment,
    latency_stats,
    model_note,
    photo_clip,
    pyplot,
    stream_config,
    synchronize,
    usage_error,
)
from stream import schedule
from stream.devices import cpu_convolutions

PROG = "compare_diffusers"
MODULE = "benchmarks.compare_diffusers"
VARIANTS = ("stream", "pipeline", "pipeline_cached_prompt")
LABELS = {
    "stream": "StreamDenoiser",
    "pipeline": "diffusers img2img (prompt)",
    "pipeline_cached_prompt": "diffusers img2img (cached embeds)",
}
CLIP_LENGTH = 64  # the panning clip is cycled when more frames are asked for


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=f"python -m {MODULE}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser, frames=48, warmup=3)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        config = stream_config(args, scheduler="ddim", noise="fixed")
        check_plot_target(args.plot)
        bench = Benchmark.load(config)
    except UsageError as exc:
        return usage_error(PROG, str(exc))
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    frames = photo_clip("pan", min(CLIP_LENGTH, args.warmup + args.frames), (config.height, config.width))
    latencies, calls = bench.run(frames, args.warmup, args.frames)
    report = bench.report(latencies, calls, args, command_line(MODULE, argv))
    print_table(report)
    if args.plot:
        plot(latencies, report, args.plot)
        print(f"plot: {args.plot}")
    print(json.dumps(report))
    if not report["same_unet_steps"]:
        print(
            f"{PROG}: error: the pipeline made {calls['pipeline']} UNet calls per frame, the stream "
            f"{calls['stream']}: the comparison is not like for like",
            file=sys.stderr,
        )
        return 1
    return 0


class Benchmark:
    """A StreamDenoiser and an img2img pipeline sharing one set of loaded components."""

    def __init__(self, components: Any, config: Any) -> None:
        from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

        from stream.denoiser import StreamDenoiser

        config = config.replace(timesteps="diffusers")  # the pipeline's own grid: the same UNet calls
        self.config = config
        self.components = components
        self.denoiser = StreamDenoiser(components, config)
        self.device = self.denoiser.device
        self.inference_steps = schedule.inference_steps_for(config.steps, config.strength)
        vae = components.vae
        if self.denoiser.engine.vae_dtype != self.denoiser.dtype:
            # The stream runs a force_upcast autoencoder in float32; diffusers' img2img runs it in the
            # pipeline's dtype, so it gets a copy of its own in that dtype.
            vae = copy.deepcopy(vae).to(self.denoiser.dtype)
        self.pipe = StableDiffusionImg2ImgPipeline(
            vae=vae,
            text_encoder=components.text_encoder,
            tokenizer=components.tokenizer,
            unet=components.unet,
            scheduler=DDIMScheduler.from_config(components.scheduler_config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        self.pipe.set_progress_bar_config(disable=True)
        assert self.pipe.unet is self.denoiser.engine.unet
        self.cfg = config.cfg and components.unet.config.time_cond_proj_dim is None
        with torch.inference_mode():
            self.prompt_embeds, self.negative_embeds = self.pipe.encode_prompt(
                config.prompt, self.device, 1, self.cfg, config.negative_prompt
            )

    @classmethod
    def load(cls, config: Any) -> Benchmark:
        """Load the model; a model, device or size that cannot work becomes a UsageError."""
        from stream.config import ConfigError
        from stream.models import ModelError, load_model

        try:
            schedule.inference_steps_for(config.steps, config.strength)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        try:
            return cls(load_model(config), config)
        except (ModelError, ConfigError) as exc:
            raise UsageError(str(exc)) from exc

    # ------------------------------------------------------------------ the three variants
    def stream(self, frame: np.ndarray) -> np.ndarray:
        return self.denoiser(frame)

    def pipeline(self, frame: np.ndarray) -> np.ndarray:
        return self._pipe(frame, prompt=self.config.prompt, negative_prompt=self.config.negative_prompt)

    def pipeline_cached_prompt(self, frame: np.ndarray) -> np.ndarray:
        return self._pipe(
            frame, prompt_embeds=self.prompt_embeds, negative_prompt_embeds=self.negative_embeds
        )

    def _pipe(self, frame: np.ndarray, **prompt: Any) -> np.ndarray:
        from PIL import Image

        images = self.pipe(
            image=Image.fromarray(frame),
            strength=self.config.strength,
            num_inference_steps=self.inference_steps,
            guidance_scale=self.config.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(self.config.seed),
            output_type="np",
            **prompt,
        ).images  # (1, H, W, 3) float in [0, 1]
        return (images[0] * 255).round().clip(0, 255).astype(np.uint8)

    # ------------------------------------------------------------------ measuring
    def run(
        self, clip: list[np.ndarray], warmup: int, frames: int
    ) -> tuple[dict[str, list[float]], dict[str, float]]:
        """Per-frame milliseconds of each variant, and UNet calls per measured frame of each."""
        fns: dict[str, Callable[[np.ndarray], np.ndarray]] = {name: getattr(self, name) for name in VARIANTS}
        for i in range(warmup):
            for fn in fns.values():
                fn(clip[i % len(clip)])
        self.denoiser.reset()
        counts = dict.fromkeys(VARIANTS, 0)
        current = ["stream"]

        def count(*_: Any) -> None:
            counts[current[0]] += 1

        hook = self.denoiser.engine.unet.register_forward_hook(count)
        latencies: dict[str, list[float]] = {name: [] for name in VARIANTS}
        try:
            for i in range(frames):
                frame = clip[(warmup + i) % len(clip)]
                for name, fn in fns.items():
                    current[0] = name
                    synchronize(self.device)
                    start = time.perf_counter()
                    fn(frame)
                    synchronize(self.device)
                    latencies[name].append((time.perf_counter() - start) * 1000.0)
        finally:
            hook.remove()
        return latencies, {name: counts[name] / frames for name in VARIANTS}

    def report(
        self,
        latencies: dict[str, list[float]],
        calls: dict[str, float],
        args: Any,
        command: str,
    ) -> dict[str, Any]:
        stats = {name: latency_stats(latencies[name]) for name in VARIANTS}
        same = len({calls[name] for name in VARIANTS}) == 1 and calls["stream"] == self.config.steps
        c = self.config
        return {
            "benchmark": "compare_diffusers",
            "model": self.components.name,
            "model_arg": c.model,
            "random_weights": bool(self.components.placeholder),
            "note": model_note(self.components.name, self.components.placeholder),
            **environment(self.device),
            "dtype": str(self.denoiser.dtype).removeprefix("torch."),
            "cpu_convolutions": (cpu_convolutions() if self.device.type == "cpu" else None),
            "width": c.width,
            "height": c.height,
            "steps": c.steps,
            "strength": c.strength,
            "guidance": c.guidance_scale,
            "cfg": self.cfg,
            "prompt": c.prompt,
            "pipeline_num_inference_steps": self.inference_steps,
            "unet_calls_per_frame": calls,
            "same_unet_steps": same,
            "frames": len(latencies["stream"]),
            "warmup": args.warmup,
            **{name: _rounded(stats[name]) for name in VARIANTS},
            "ratio_p50": {
                name: round(stats[name]["p50_ms"] / stats["stream"]["p50_ms"], 3) for name in VARIANTS[1:]
            },
            "command": command,
        }


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 3) for key, value in values.items()}


# ---------------------------------------------------------------------- output
def print_table(r: dict[str, Any]) -> None:
    calls = r["unet_calls_per_frame"]
    print(f"compare_diffusers: {r['model']} on {r['gpu'] or r['device']} ({r['dtype']}) -- {r['note']}")
    print(
        f"{r['width']}x{r['height']}, {r['steps']} DDIM steps at strength {r['strength']}, guidance "
        f"{r['guidance']} ({'CFG, batch of 2' if r['cfg'] else 'no CFG'}), {r['frames']} frames after "
        f"{r['warmup']} warm-up; pipeline num_inference_steps={r['pipeline_num_inference_steps']}"
    )
    same = "yes" if r["same_unet_steps"] else "NO"
    print(f"same number of UNet calls per frame: {same} ({', '.join(f'{v:g}' for v in calls.values())})")
    if r["cpu_convolutions"]:
        print(f"CPU convolutions: {r['cpu_convolutions']} (picked once for the process, used by all three)")
    print()
    header = f"{'variant':<34}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'FPS':>8}"
    header += f"{'UNet/frame':>12}{'p50/stream':>12}"
    print(header)
    print("-" * len(header))
    for name in VARIANTS:
        s = r[name]
        ratio = 1.0 if name == "stream" else r["ratio_p50"][name]
        print(
            f"{LABELS[name]:<34}{s['p50_ms']:>9.2f}{s['p95_ms']:>9.2f}{s['p99_ms']:>9.2f}{s['fps']:>8.1f}"
            f"{calls[name]:>12g}{ratio:>11.2f}x"
        )


def plot(latencies: dict[str, list[float]], report: dict[str, Any], path: str) -> None:
    plt = pyplot()
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name in VARIANTS:
        ax.plot(latencies[name], label=f"{LABELS[name]} (p50 {report[name]['p50_ms']:.1f} ms)", lw=1.2)
    ax.set_xlabel("measured frame")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_ylabel("latency per frame (ms)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(
        f"{report['model']} on {report['gpu'] or report['device']}, {report['width']}x{report['height']}, "
        f"{report['steps']} steps, strength {report['strength']}, guidance {report['guidance']}\n"
        f"{report['note']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
