"""StreamDiffusion itself (PyPI `streamdiffusion` 0.1.1 with the diffusers 0.24 it pins) on the suite's
random weights, in a subprocess whose path puts a separate package folder first.

`run_streamdiffusion` (the suite's side) saves the loaded components' weights and configs to a folder
and starts this file as a script with PYTHONPATH=<that package folder>; the script (`main`) imports
only torch, numpy and the old packages, rebuilds the same modules, loads the weights and times
StreamDiffusion's own per-frame call, from a uint8 frame in to a uint8 frame out, 1 step without CFG
(A) and 4 steps with CFG as one batched call (B; its `cfg_type="full"`), no TensorRT; xformers when
installed, else diffusers' SDPA attention. Prints one JSON object as its last line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

T_INDEX = {"A": [32], "B": [16, 24, 32, 45]}  # of StreamDiffusion's 50-step LCM grid, as its examples pick
SKIP_CONFIG = ("dtype", "torch_dtype", "transformers_version", "architectures", "_name_or_path")


def run_streamdiffusion(
    components: Any, size: int, modes: dict[str, float], site: Path, timeout: float, frames: int, warmup: int
) -> dict[str, Any]:
    """StreamDiffusion on `components` for each mode (name -> guidance); its figures, or why not."""
    import torch

    if not (site / "streamdiffusion").is_dir():
        return {
            "status": "not run",
            "reason": f"streamdiffusion is not installed in {site}; benchmarks/gpu/README.md says how",
        }
    work = Path(tempfile.mkdtemp(prefix="streamdiffusion-"))
    try:
        configs = {
            "unet": dict(components.unet.config),
            "vae": dict(components.vae.config),
            "vae_class": type(components.vae).__name__,
            "text_encoder": {
                k: v for k, v in components.text_encoder.config.to_dict().items() if k not in SKIP_CONFIG
            },
            "scheduler": components.scheduler_config,
        }
        components.tokenizer.save_pretrained(work / "tokenizer")
        (work / "configs.json").write_text(json.dumps(configs, default=list))
        for name in ("unet", "vae", "text_encoder"):
            state = {k: v.detach().cpu() for k, v in getattr(components, name).state_dict().items()}
            torch.save(state, work / f"{name}.pt")
        device = str(next(components.unet.parameters()).device)
        command = [sys.executable, __file__, str(work), device, str(size), json.dumps(modes), str(frames)]
        command.append(str(warmup))
        env = {**os.environ, "PYTHONPATH": str(site), "PYTHONUNBUFFERED": "1"}
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"status": "timed out", "error": f"StreamDiffusion took over {timeout:.0f} s"}
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            error = f"exit {done.returncode}: {tail[:300]}"
            return {"status": "failed", "error": error, "stderr_tail": done.stderr[-3000:]}
        return {"status": "ok", **json.loads(lines[-1])}
    except Exception as exc:
        return {"status": "failed", "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str]) -> int:
    import diffusers
    import numpy as np
    import torch
    from diffusers import (
        AutoencoderKL,
        AutoencoderTiny,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,  # noqa: I001 (the old diffusers the script runs under)
    )
    from streamdiffusion import StreamDiffusion
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizerFast

    work, device_name, size = Path(argv[0]), argv[1], int(argv[2])
    modes, frames, warmup = json.loads(argv[3]), int(argv[4]), int(argv[5])
    device = torch.device(device_name)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    configs = json.loads((work / "configs.json").read_text())
    vae_class = AutoencoderTiny if configs["vae_class"] == "AutoencoderTiny" else AutoencoderKL
    with device:  # built where they run: initializing 1.2B parameters on a CPU takes long
        modules = {
            "unet": UNet2DConditionModel.from_config(configs["unet"]),
            "vae": vae_class.from_config(configs["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        }
    missing = 0
    for name, module in modules.items():
        state = torch.load(work / f"{name}.pt", weights_only=True)
        if name == "text_encoder":  # transformers 5 names CLIPTextModel's weights without its prefix
            state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
        result = module.load_state_dict(state, strict=False)
        missing += len(result.missing_keys) + len(result.unexpected_keys)
        module.to(device, dtype).eval()
    pipe = StableDiffusionPipeline(
        **modules,
        tokenizer=CLIPTokenizerFast.from_pretrained(work / "tokenizer"),
        scheduler=DDIMScheduler.from_config(configs["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    try:
        import xformers  # noqa: F401

        pipe.enable_xformers_memory_efficient_attention()
        acceleration = "xformers"
    except ImportError:
        acceleration = "none (diffusers' SDPA attention; xformers is not installed)"
    rng = np.random.default_rng(0)
    clip = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(8)]
    out: dict[str, Any] = {
        "diffusers": diffusers.__version__,
        "acceleration": acceleration,
        "weights_not_matched": missing,
        "modes": {},
    }
    for mode, guidance in modes.items():
        stream = StreamDiffusion(
            pipe, t_index_list=T_INDEX[mode], torch_dtype=dtype, width=size, height=size,
            cfg_type="full" if guidance > 1 else "none",
        )  # fmt: skip
        stream.prepare("an oil painting of a cup of coffee", num_inference_steps=50, guidance_scale=guidance)
        latencies = []
        for i in range(warmup + frames):
            start = time.perf_counter()
            frame = _frame_through(stream, clip[i % len(clip)], device, dtype)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                latencies.append((time.perf_counter() - start) * 1000.0)
            assert frame.shape == (size, size, 3)
        ms = np.asarray(latencies)
        out["modes"][mode] = {
            "t_index_list": T_INDEX[mode],
            "cfg_type": stream.cfg_type,
            "frames": len(latencies),
            "fps": round(1000.0 / float(ms.mean()), 2),
            **{f"p{q}_ms": round(float(np.percentile(ms, q)), 3) for q in (50, 95, 99)},
        }
        if device.type != "cuda":
            out["modes"][mode]["note"] = (
                "cpu rehearsal: its per-frame steps called directly (its call needs CUDA)"
            )
    print(json.dumps(out))
    return 0


def _frame_through(stream: Any, frame: Any, device: Any, dtype: Any) -> Any:
    """A uint8 frame in, a uint8 frame out, through StreamDiffusion's own per-frame call."""
    import torch

    x = torch.from_numpy(frame).to(device).permute(2, 0, 1).unsqueeze(0).float() / 255.0  # (1, 3, H, W)
    if device.type == "cuda":
        image = stream(x)
    else:  # its __call__ times itself with CUDA events: the same steps, called directly
        x = stream.image_processor.preprocess(x, stream.height, stream.width).to(device=device, dtype=dtype)
        image = stream.decode_image(stream.predict_x0_batch(stream.encode_image(x)))
    image = ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0)
    return image.cpu().numpy()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
