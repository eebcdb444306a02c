"""Stream Batch and residual CFG: each frame against a step-by-step reference written from the equations,
its input's label on its output, settings that apply to frames entering after them, UNet rows per call."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from stream import schedule
from stream.batch import FrameResult, process_batch
from stream.config import ConfigError, StreamConfig
from stream.denoiser import StreamDenoiser
from stream.engine import Engine
from stream.models import Components, load_model
from tests.conftest import pan_clip
from tests.test_engine import lcm_unet_components

SIZE = 64
# float64 engine: a row alone and a row inside a larger batch agree to rounding (see test_engine.py)
TOLERANCE = 1e-4  # on the 0-255 scale


def config(**changes: object) -> StreamConfig:
    base: dict[str, object] = {
        "model": "tiny",
        "width": SIZE,
        "height": SIZE,
        "device": "cpu",
        "steps": 3,
        "strength": 0.8,
        "prompt": "a watercolor cup",
        "negative_prompt": "blurry",
        "seed": 5,
    }
    base.update(changes)
    return StreamConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def components(tiny_model_dir: Path) -> Components:
    return load_model(config())


@pytest.fixture(scope="module")
def engine64(tiny_model_dir: Path) -> Engine:
    """Its own model in float64 (the engine converts the modules it gets)."""
    return Engine(load_model(config()), torch.device("cpu"), torch.float64, "sdpa")


def clip(count: int) -> list[np.ndarray]:
    return pan_clip(count, (SIZE, SIZE), step=9)


@contextmanager
def rows_per_call(engine: Engine) -> Iterator[list[int]]:
    """The number of rows of every UNet call made inside the block."""
    counts: list[int] = []
    hook = engine.unet.register_forward_pre_hook(lambda _m, args: counts.append(int(args[0].shape[0])))
    try:
        yield counts
    finally:
        hook.remove()


def reference(engine: Engine, frame: np.ndarray, c: StreamConfig) -> torch.Tensor:
    """One frame through img2img, step by step: the streaming timesteps, the stream's seeded noise, DDIM
    (eta 0) steps, and guidance written here from the equations: CFG e_u + w (e_c - e_u) (Ho & Salimans
    2022); residual CFG (StreamDiffusion, arXiv 2312.12491, sec. 3.2): the virtual residual noise
    e' = (x_t - sqrt(a_t) x_0) / sqrt(1 - a_t) to x_0 (self-negative: the input latent; onetime-negative:
    x_0 denoised with the negative prompt at the first step) and e = d e' + w (e_c - d e').
    Returns the decoded canvas (1, 3, H, W) in [0, 1]."""
    ts, prev = schedule.streaming_timesteps(c.steps, c.strength)
    table = engine.alphas_cumprod  # the tiny model's scheduler: set_alpha_to_one=False

    def alpha(t: int) -> torch.Tensor:
        return table[t] if t >= 0 else table[0]

    image = torch.from_numpy(frame).permute(2, 0, 1)[None].to(engine.dtype) / 127.5 - 1.0
    with torch.inference_mode():
        latent = engine.encode(image)
        generator = torch.Generator("cpu").manual_seed(c.seed)
        noise = torch.randn(latent.shape, generator=generator, dtype=torch.float32).to(engine.dtype)
        x = schedule.add_noise(latent, noise, alpha(ts[0]))
        cond, uncond = engine.encode_prompt(c.prompt), engine.encode_prompt(c.negative_prompt)
        x0_ref = latent
        w, d = c.guidance_scale, c.delta
        for i, t in enumerate(ts):
            a = alpha(t).to(engine.dtype)
            step = torch.tensor([t])
            if (c.cfg_mode == "full" or (c.cfg_mode == "once" and i == 0)) and w > 1:
                e_u, e_c = engine.run_unet(
                    torch.cat([x, x]), step.expand(2), torch.cat([uncond, cond]), None
                ).chunk(2)
            else:
                e_u, e_c = None, engine.run_unet(x, step, cond, None)
            if c.cfg_mode == "full" and w > 1:
                assert e_u is not None
                eps = e_u + w * (e_c - e_u)
            elif c.cfg_mode in ("self", "once") and w > 1:
                if e_u is not None:  # onetime-negative: x_0 denoised with the negative prompt
                    x0_ref = (x - (1 - a).sqrt() * e_u) / a.sqrt()
                residual = (x - a.sqrt() * x0_ref) / (1 - a).sqrt()
                eps = d * residual + w * (e_c - d * residual)
            else:
                eps = e_c
            x, _ = schedule.ddim_step(x, eps, alpha(t), alpha(prev[i]))
        return engine.decode(x)


def canvas(result: FrameResult | Exception) -> torch.Tensor:
    assert isinstance(result, FrameResult) and result.image is not None and not result.pending
    return result.image


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) * 255.0


# ---------------------------------------------------------------------- residual CFG, pure functions
def test_residual_cfg_matches_the_papers_equations_on_random_tensors() -> None:
    g = torch.Generator().manual_seed(0)
    x, x0, eps_c, eps_u = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(4))
    alpha = torch.tensor(0.37, dtype=torch.float64)
    for w, d in ((7.5, 1.0), (2.0, 0.4), (1.5, 0.0)):
        # written from the paper: e' = (x_t - sqrt(a) x_0) / sqrt(b), b = 1 - a; e = d e' + w (e_c - d e')
        a, b = alpha.item(), 1.0 - alpha.item()
        residual = (x - a**0.5 * x0) / b**0.5
        expected = d * residual + w * (eps_c - d * residual)
        got = schedule.rcfg_combine(eps_c, schedule.residual_noise(x, x0, alpha), w, d)
        assert (got - expected).abs().max() <= 1e-6
    # self-negative: at the first step the residual to the input latent is the stream's own noise
    first = schedule.add_noise(x0, eps_u, alpha)
    assert (schedule.residual_noise(first, x0, alpha) - eps_u).abs().max() <= 1e-6
    # onetime-negative: the residual to the negative x_0 is the negative prediction itself
    neg = schedule.negative_x0(x, eps_u, alpha)
    assert (schedule.residual_noise(x, neg, alpha) - eps_u).abs().max() <= 1e-6
    # delta 0: the residual drops out, leaving w e_c (the paper's equation at d = 0)
    assert torch.equal(schedule.rcfg_combine(eps_c, residual, 3.0, 0.0), 3.0 * eps_c)


# ---------------------------------------------------------------------- Stream Batch off: as before
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_stream_batch_off_equals_the_step_by_step_reference_exactly(
    components: Components, guidance: float
) -> None:
    c = config(guidance_scale=guidance)
    denoiser = StreamDenoiser(components, c)
    for i, frame in enumerate(clip(2)):
        result = denoiser.process(frame, tag=i)
        assert result.tag == i and not result.pending
        assert torch.equal(canvas(result), reference(denoiser.engine, frame, c))


def test_stream_batch_with_one_step_is_the_same_as_without(components: Components) -> None:
    on = StreamDenoiser(components, config(steps=1, stream_batch=True, guidance_scale=3.0))
    off = StreamDenoiser(components, config(steps=1, guidance_scale=3.0))
    for frame in clip(3):
        assert torch.equal(canvas(on.process(frame)), canvas(off.process(frame)))


# ---------------------------------------------------------------------- Stream Batch on
@pytest.mark.parametrize("mode", ["full", "self", "once", "none"])
def test_stream_batch_emits_input_i_as_the_reference_gives_it_with_its_label(
    engine64: Engine, mode: str
) -> None:
    c = config(stream_batch=True, cfg_mode=mode, guidance_scale=3.0, delta=0.7)
    denoiser = StreamDenoiser(engine64, c)
    frames = clip(6)
    rows: list[int] = []
    for i, frame in enumerate(frames):
        with rows_per_call(engine64) as counts:
            result = denoiser.process(frame, tag=f"pts {i}")
        rows += counts
        assert len(counts) == 1  # one UNet call per frame, whatever the step count
        if i < c.steps - 1:  # the first k-1 calls emit nothing: no warm-up frames
            assert result.pending and result.frame.size == 0 and result.tag is None
            continue
        source = i - (c.steps - 1)
        assert result.tag == f"pts {source}"  # the input it came from, not the newest
        assert diff(canvas(result), reference(engine64, frames[source], c)) <= TOLERANCE
        assert result.timings["in_flight"] >= result.timings["total"]  # the added delay is measured
    # rows per call once full: a row per frame in flight (x2 with full CFG, +1 uncond row with `once`)
    per_frame = {"full": 2, "self": 1, "once": 1, "none": 1}[mode]
    assert rows[-1] == c.steps * per_frame + (mode == "once")
    assert rows[0] == per_frame + (mode == "once")  # the first call: the entering frame alone


@pytest.mark.parametrize("scheduler", ["ddim", "lcm"])
@pytest.mark.parametrize("guidance_unet", [False, True])
def test_stream_batch_gives_each_input_the_frame_it_gets_without(
    tiny_model_dir: Path, scheduler: str, guidance_unet: bool
) -> None:
    """Fixed noise and no feedback: each frame is its own, so Stream Batch only delays it (LCM's step
    noises and a guidance-embedding UNet included)."""
    model = lcm_unet_components() if guidance_unet else load_model(config())
    engine = Engine(model, torch.device("cpu"), torch.float64, "sdpa")
    c = config(scheduler=scheduler, guidance_scale=2.0, cfg_mode="self", steps=3)
    on, off = StreamDenoiser(engine, c.replace(stream_batch=True)), StreamDenoiser(engine, c)
    expected = {}
    for i, frame in enumerate(clip(5)):
        expected[i] = canvas(off.process(frame, tag=i))
        result = on.process(frame, tag=i)
        if i >= 2:
            assert result.tag == i - 2 and diff(canvas(result), expected[i - 2]) <= TOLERANCE


@pytest.mark.parametrize("mode", ["self", "once"])
def test_residual_cfg_without_stream_batch_matches_the_reference(engine64: Engine, mode: str) -> None:
    c = config(cfg_mode=mode, guidance_scale=2.5, delta=0.8)
    denoiser = StreamDenoiser(engine64, c)
    frame = clip(1)[0]
    with rows_per_call(engine64) as counts:
        result = denoiser.process(frame)
    assert counts == ([2, 1, 1] if mode == "once" else [1, 1, 1])  # no row for the negative prompt after
    assert diff(canvas(result), reference(engine64, frame, c)) <= TOLERANCE


def test_rows_per_call_of_each_cfg_mode(components: Components) -> None:
    expected = {"full": [2, 2, 2], "self": [1, 1, 1], "once": [2, 1, 1], "none": [1, 1, 1]}
    for mode, rows in expected.items():
        denoiser = StreamDenoiser(components, config(cfg_mode=mode, guidance_scale=5.0))
        with rows_per_call(denoiser.engine) as counts:
            denoiser.process(clip(1)[0])
        assert counts == rows, mode


def test_residual_cfg_with_delta_0_ignores_the_residual(engine64: Engine) -> None:
    """The paper's equation at delta 0 is w e_c: the stream's noise and history no longer matter, and
    `self` and `once` (whose negative rows then weigh nothing) give the same frames."""
    frame = clip(1)[0]
    outputs = [
        canvas(StreamDenoiser(engine64, config(cfg_mode=m, guidance_scale=2.0, delta=0.0)).process(frame))
        for m in ("self", "once")
    ]
    assert diff(*outputs) <= TOLERANCE
    with_residual = StreamDenoiser(engine64, config(cfg_mode="self", guidance_scale=2.0, delta=1.0))
    assert diff(outputs[0], canvas(with_residual.process(frame))) > 1.0  # delta does something


def test_a_setting_change_applies_to_frames_entering_after_it(engine64: Engine) -> None:
    before = config(stream_batch=True, guidance_scale=3.0)
    after = before.replace(prompt="a neon city at night", guidance_scale=6.0, cfg_mode="self")
    denoiser = StreamDenoiser(engine64, before)
    frames = clip(7)
    emitted: dict[int, torch.Tensor] = {}
    for i, frame in enumerate(frames):
        if i == 3:
            denoiser.update(after)
        result = denoiser.process(frame, tag=i)
        if not result.pending:
            emitted[result.tag] = canvas(result)
    assert sorted(emitted) == [0, 1, 2, 3, 4]
    for i, image in emitted.items():
        assert diff(image, reference(engine64, frames[i], before if i < 3 else after)) <= TOLERANCE


def test_a_step_count_change_keeps_outputs_in_input_order(components: Components) -> None:
    denoiser = StreamDenoiser(components, config(stream_batch=True, steps=4))
    tags = []
    for i, frame in enumerate(clip(12)):
        if i == 6:
            denoiser.update(denoiser.config.replace(steps=1))
        if i == 9:
            denoiser.update(denoiser.config.replace(steps=3))
        result = denoiser.process(frame, tag=i)
        if not result.pending:
            tags.append(result.tag)
    assert tags == sorted(tags) and len(set(tags)) == len(tags)
    assert tags[:3] == [0, 1, 2] and 6 in tags and 9 in tags  # each new setting's first frame gets out
    assert denoiser._state.pipeline.dropped == 3  # inputs 3-5, overtaken by input 6 at 1 step


def test_the_similarity_filter_holds_the_pipeline(components: Components) -> None:
    denoiser = StreamDenoiser(components, config(stream_batch=True, similarity_threshold=0.99, max_skip=3))
    frames = clip(3)
    for i, frame in enumerate(frames):
        denoiser.process(frame, tag=i)
    calls = denoiser.engine.calls
    same = denoiser.process(frames[-1].copy(), tag="same")  # a still scene: the model does not run
    assert same.skipped and same.pending and denoiser.engine.calls == calls
    assert len(denoiser._state.pipeline) == 2  # the frames in flight wait, in order
    moved = denoiser.process(clip(5)[4], tag="moved")
    assert moved.tag == 1 and denoiser.engine.calls == calls + 1


def test_streams_with_stream_batch_share_the_round_with_other_streams(engine64: Engine) -> None:
    configs = [
        config(stream_batch=True, steps=3, prompt="a cat"),
        config(stream_batch=True, steps=2, guidance_scale=3.0, cfg_mode="once", seed=9),
        config(steps=2, prompt="a dog", guidance_scale=2.0),
    ]
    alone = [StreamDenoiser(engine64, c) for c in configs]
    together = [StreamDenoiser(engine64, c) for c in configs]
    for i, frame in enumerate(clip(4)):
        expected = [d.process(frame, tag=i) for d in alone]
        with rows_per_call(engine64) as counts:
            results = process_batch(together, [frame] * 3, [i] * 3)
        assert len(counts) == 2  # the Stream Batch streams join the first of the other stream's 2 calls
        for e, r in zip(expected, results, strict=True):
            assert isinstance(r, FrameResult) and r.pending == e.pending and r.tag == e.tag
            if not e.pending:
                assert diff(canvas(e), canvas(r)) <= TOLERANCE


def test_stream_batch_and_cfg_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="cfg_mode must be one of full, self, once, none"):
        config(cfg_mode="half")
    with pytest.raises(ConfigError, match=r"delta must be in \[0, 2\]"):
        config(delta=-1.0)
    with pytest.raises(ConfigError, match="stream_batch must be true or false"):
        config(stream_batch="yes")


# ---------------------------------------------------------------------- the command line
def test_run_with_stream_batch_writes_no_warm_up_frames(tmp_path: Path, tiny_model_dir: Path) -> None:
    import av

    from stream.cli import main
    from stream.media import VideoFileSink

    source, out = tmp_path / "pan.mp4", tmp_path / "out.mp4"
    sink = VideoFileSink(source, fps=24)
    for frame in clip(8):
        sink.write(frame)
    sink.close()
    size = ["--model", "tiny", "--width", "64", "--height", "64", "--device", "cpu", "-q"]
    args = ["run", "--source", str(source), "--sink", str(out), "--steps", "3", "--strength", "0.8", *size]
    assert main([*args, "--stream-batch", "--cfg", "self", "--guidance", "2", "--delta", "0.5"]) == 0
    with av.open(str(out)) as container:
        written = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    # 8 inputs, 3 steps: the first 2 calls emit nothing (no frame made from noise alone), and the last
    # 2 inputs, still in flight when the file ends, are run to their end: every input is written once
    assert len(written) == 8 and all(np.abs(f.astype(np.int16) - 128).max() > 0 for f in written)


def test_bench_compares_stream_batch_and_cfg_modes_in_one_run(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    import json

    from stream.cli import main

    args = ["bench", "--model", "tiny", "--width", "64", "--height", "64", "--device", "cpu", "--steps", "3"]
    extra = ["--guidance", "3", "--stream-batch", "on,off", "--cfg", "full,once", "--frames", "4"]
    assert main([*args, *extra, "--warmup", "3", "-q"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert "UNet calls/frame" in out[2]
    got = {(r["stream_batch"], r["cfg"]): r for r in summary["rows"]}
    assert set(got) == {(True, "full"), (True, "once"), (False, "full"), (False, "once")}
    assert got[True, "full"]["unet_calls_per_frame"] == 1 and got[False, "full"]["unet_calls_per_frame"] == 3
    assert got[True, "full"]["unet_rows_per_frame"] == 6 and got[True, "once"]["unet_rows_per_frame"] == 4
    assert got[True, "once"]["delay_frames"] == 2 and got[False, "once"]["delay_frames"] == 0
    assert all(r["outputs"] == 4 and r["latency_ms"]["p95"] > 0 for r in summary["rows"])


@pytest.mark.parametrize(
    "extra,words",
    [
        (["run", "--source", "synthetic", "--sink", "x.mp4", "--cfg", "full,self"], "lists (e.g. --cfg"),
        (["run", "--source", "synthetic", "--sink", "x.mp4", "--cfg", "slef"], "did you mean self"),
        (["serve", "--stream-batch", "maybe"], "--stream-batch takes on or off"),
        (["serve", "--delta", "5"], "delta must be in [0, 2]"),
        (["bench", "--cfg", "full,self"], "set --guidance above 1"),
    ],
)
def test_bad_stream_batch_arguments(extra: list[str], words: str, capsys: pytest.CaptureFixture) -> None:
    from stream.cli import main

    assert main([*extra, "--model", "tiny", "--width", "64", "--height", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
