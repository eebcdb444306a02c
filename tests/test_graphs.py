"""Static shapes: bucket choice, padding rows that never change the real rows, the engine routed through
the padded calls, the flags and their errors, fp16 autoencoders that upcast, and CUDA graphs (GPU only)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from stream import graphs
from stream.args import UsageError, add_config_arguments, config_from_args
from stream.batch import process_batch
from stream.config import ConfigError, StreamConfig
from stream.denoiser import StreamDenoiser
from stream.engine import Engine
from stream.graphs import GraphRunner, bucket_for, pad_rows, run_padded
from stream.models import Components, load_model
from tests.conftest import cpu_config, pan_clip

SIZE = 64


def config(**changes: object) -> StreamConfig:
    return cpu_config(SIZE, **changes)


@pytest.fixture(scope="module")
def components(tiny_model_dir: Path) -> Components:
    return load_model(config())


@pytest.mark.parametrize(
    ("rows", "bucket"),
    [(1, 1), (2, 2), (3, 4), (5, 6), (7, 8), (9, 12), (13, 16), (17, 24), (25, 32), (32, 32), (33, 48)],
)
def test_bucket_is_the_smallest_that_holds_the_rows(rows: int, bucket: int) -> None:
    assert bucket_for(rows) == bucket


def test_a_batch_of_no_rows_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one row"):
        bucket_for(0)


def test_pad_rows_repeats_the_last_row_and_keeps_none() -> None:
    x = torch.arange(6.0).reshape(3, 2)
    padded, none = pad_rows([x, None], 4)
    assert none is None and padded is not None
    assert torch.equal(padded[:3], x) and torch.equal(padded[3], x[2])
    (same,) = pad_rows([x], 3)
    assert same is x


def unet_inputs(engine: Engine, rows: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    h = SIZE // engine.vae_factor
    x = torch.randn(rows, engine.latent_channels, h, h, generator=g)
    t = torch.randint(1, 999, (rows,), generator=g)
    embeds = torch.randn(rows, 77, 32, generator=g)
    return x, t, embeds


@pytest.mark.parametrize("rows", [1, 3, 5, 7])
def test_padding_rows_do_not_change_the_real_rows(components: Components, rows: int) -> None:
    engine = Engine.shared(components, config())
    x, t, embeds = unet_inputs(engine, rows, seed=rows)
    with torch.inference_mode():
        alone = engine._unet(x, t, embeds, None)
        padded = run_padded(engine._unet, [x, t, embeds, None])
        # the padding rows replaced by unrelated rows: the real rows still come out the same
        ox, ot, oe = unet_inputs(engine, bucket_for(rows) + 3 - rows, seed=99)
        mixed = engine._unet(torch.cat([x, ox]), torch.cat([t, ot]), torch.cat([embeds, oe]), None)[:rows]
    assert padded.shape == alone.shape == x.shape
    assert torch.allclose(padded, alone, atol=1e-5, rtol=1e-5)
    assert torch.allclose(mixed, alone, atol=1e-5, rtol=1e-5)


def test_encode_and_decode_padded_give_the_real_rows(components: Components) -> None:
    engine = Engine.shared(components, config())
    images = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        latents = engine._encode(images)
        assert torch.allclose(run_padded(engine._encode, [images]), latents, atol=1e-5)
        assert torch.allclose(run_padded(engine._decode, [latents]), engine._decode(latents), atol=1e-5)


def test_engine_routed_through_padded_runners_gives_the_same_frames(components: Components) -> None:
    """The engine's calls through GraphRunner (eager here: the same padding a CUDA graph replays) give
    every stream of a batch of 3 (padded to 4 rows) the frames the plain engine gives."""
    settings = [{"seed": 1, "prompt": "a"}, {"seed": 2, "guidance_scale": 3.0}, {"seed": 3, "steps": 1}]
    clip = pan_clip(3, (SIZE, SIZE), step=5)
    plain = Engine(components, torch.device("cpu"), torch.float32, "sdpa")
    padded = Engine(components, torch.device("cpu"), torch.float32, "sdpa")
    padded.graph_runners = {
        "unet": GraphRunner(padded._unet, "unet", capture=False),
        "encode": GraphRunner(padded._encode, "encode", capture=False),
        "decode": GraphRunner(padded._decode, "decode", capture=False),
    }
    outputs = []
    for engine in (plain, padded):
        denoisers = [StreamDenoiser(engine, config(**s)) for s in settings]  # type: ignore[arg-type]
        outputs.append([r.frame for r in process_batch(denoisers, clip)])  # type: ignore[union-attr]
    for a, b in zip(*outputs, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_a_graph_that_cannot_be_captured_falls_back_to_the_padded_eager_call(
    components: Components, caplog: pytest.LogCaptureFixture
) -> None:
    """Capture fails (here: no CUDA at all): one warning, then the same rows as without graphs."""
    engine = Engine.shared(components, config())
    runner = GraphRunner(engine._unet, "unet", capture=True)
    x, t, embeds = unet_inputs(engine, 3, seed=5)
    with torch.inference_mode(), caplog.at_level("WARNING", logger="stream.graphs"):
        first = runner(x, t, embeds, None)
        second = runner(x, t, embeds, None)
        expected = engine._unet(x, t, embeds, None)
    assert not runner.capture and not runner.graphs
    assert [r.message for r in caplog.records if "could not capture" in r.message] != []
    assert len([r for r in caplog.records if "could not capture" in r.message]) == 1
    assert torch.allclose(first, expected, atol=1e-5) and torch.equal(first, second)


def test_graphs_auto_is_off_on_cpu_and_on_is_refused_there(components: Components) -> None:
    cpu = torch.device("cpu")
    assert not graphs.use_graphs("auto", cpu) and not graphs.use_graphs("off", cpu)
    with pytest.raises(ConfigError, match="--cuda-graphs on needs a CUDA device") as info:
        Engine.shared(components, config(cuda_graphs="on"))
    assert "\n" not in str(info.value)
    assert Engine.shared(components, config(cuda_graphs="auto")).graph_runners == {}


@pytest.mark.parametrize(("field", "value"), [("cuda_graphs", "yes"), ("compile", "fast")])
def test_bad_speed_settings_are_refused(field: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"{field} must be one of"):
        config(**{field: value})


def test_speed_flags_reach_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    cfg = config_from_args(
        parser.parse_args(["--model", "tiny", "--cuda-graphs", "off", "--compile", "max-autotune"])
    )
    assert (cfg.cuda_graphs, cfg.compile) == ("off", "max-autotune")
    assert (StreamConfig().cuda_graphs, StreamConfig().compile) == ("auto", "off")


def test_cuda_graphs_on_without_cuda_is_refused_before_loading() -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    with pytest.raises(UsageError, match="--cuda-graphs on needs a CUDA device") as info:
        config_from_args(parser.parse_args(["--model", "tiny", "--device", "cpu", "--cuda-graphs", "on"]))
    assert "\n" not in str(info.value) and "--cuda-graphs auto" in str(info.value)


def test_a_bad_speed_flag_gets_one_line_with_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="stream bench")
    add_config_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--compile", "fast"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--compile" in err and "max-autotune" in err


def test_compile_off_keeps_the_module_and_default_wraps_it(components: Components) -> None:
    unet = components.unet
    assert graphs.compile_module(unet, "off", graphs=False) is unet
    compiled = graphs.compile_module(unet, "default", graphs=False)
    assert compiled is not unet and getattr(compiled, "_orig_mod", None) is unet
    with pytest.raises(ConfigError, match="compile must be one of"):
        graphs.compile_module(unet, "fast", graphs=False)


def tiny_components(vae: object, base: Components) -> Components:
    return Components(base.unet, vae, base.text_encoder, base.tokenizer, base.scheduler_config, "t")


def test_fp16_autoencoder_kl_with_force_upcast_runs_in_fp32(components: Components) -> None:
    torch.manual_seed(0)
    kl = AutoencoderKL(
        block_out_channels=(8, 16), norm_num_groups=8, latent_channels=4, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )  # fmt: skip
    assert kl.config.force_upcast
    base = load_model(config())  # its own copies: the engine moves modules in place
    engine = Engine(tiny_components(kl, base), torch.device("cpu"), torch.float16, "sdpa")
    assert engine.vae.dtype == torch.float32 and engine.unet.dtype == torch.float16
    images = torch.rand(2, 3, 32, 32, dtype=torch.float16) * 2 - 1
    with torch.inference_mode():
        latents = engine.encode(images)
        decoded = engine.decode(latents)
    assert latents.dtype == torch.float16 and torch.isfinite(latents).all()
    assert decoded.shape == (2, 3, 32, 32) and torch.isfinite(decoded).all()
    tiny = AutoencoderTiny(encoder_block_out_channels=(4,) * 4, decoder_block_out_channels=(4,) * 4)
    assert not tiny.config.force_upcast
    engine = Engine(tiny_components(tiny, base), torch.device("cpu"), torch.float16, "sdpa")
    assert engine.vae.dtype == torch.float16


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_give_the_eager_frames_within_fp16_tolerance(components: Components) -> None:
    cuda = {"device": "cuda", "dtype": "float16"}
    eager = StreamDenoiser(load_model(config(**cuda)), config(cuda_graphs="off", **cuda))
    replay = StreamDenoiser(load_model(config(**cuda)), config(cuda_graphs="on", **cuda))
    assert replay.engine.graph_runners and not eager.engine.graph_runners
    for frame in pan_clip(4, (SIZE, SIZE), step=5):
        a, b = eager(frame), replay(frame)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
    assert replay.engine.graph_runners["unet"].graphs  # captured, and replayed after the first frame
    # three streams in one round (CFG on one: 4 rows, then 3 rows padded to 4) through both engines
    settings = [{"seed": 1}, {"seed": 2, "guidance_scale": 3.0}, {"seed": 3, "steps": 1}]
    outputs = []
    for engine in (eager.engine, replay.engine):
        streams = [StreamDenoiser(engine, config(**cuda, **s)) for s in settings]  # type: ignore[arg-type]
        outputs.append([r.frame for r in process_batch(streams, pan_clip(3, (SIZE, SIZE), step=5))])  # type: ignore[union-attr]
    for a, b in zip(*outputs, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
