"""StreamConfig refuses every bad value with a message naming what it got and what is allowed."""

from __future__ import annotations

import math

import pytest

from stream.config import ConfigError, StreamConfig


def test_defaults_are_valid() -> None:
    config = StreamConfig()
    assert (config.width, config.height, config.steps, config.scheduler) == (512, 512, 4, "ddim")
    assert config.noise == "fixed" and config.attention == "sdpa" and config.model == "auto"
    assert not config.cfg and StreamConfig(guidance_scale=1.5).cfg


BAD = [
    ("model", ""),
    ("vae", " "),
    ("width", 500),
    ("width", 0),
    ("width", 4096),
    ("height", 250),
    ("width", 256.0),
    ("steps", 0),
    ("steps", 6),
    ("steps", True),
    ("strength", 0.0),
    ("strength", 1.7),
    ("strength", math.nan),
    ("guidance_scale", -1.0),
    ("guidance_scale", 31),
    ("scheduler", "euler"),
    ("prompt", None),
    ("negative_prompt", 3),
    ("seed", -1),
    ("seed", 1.5),
    ("latent_feedback", 1.0),
    ("latent_feedback", -0.1),
    ("noise", "random"),
    ("similarity_threshold", 1.0),
    ("similarity_threshold", -0.5),
    ("device", "gpu"),
    ("device", "cuda:x"),
    ("dtype", "fp8"),
    ("attention", "flash"),
    ("strength", 10**400),
    ("strength", math.inf),
    ("strength", True),
    ("guidance_scale", -(10**400)),
    ("latent_feedback", math.nan),
]


@pytest.mark.parametrize("name,value", BAD)
def test_bad_value_is_refused_with_a_clear_message(name: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        StreamConfig(**{name: value})  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith(f"{name} must be ") and f"got {value!r}" in message
    assert "\n" not in message


def test_replace_validates_and_refuses_unknown_names() -> None:
    config = StreamConfig()
    assert config.replace(strength=0.8).strength == 0.8
    with pytest.raises(ConfigError, match="strength must be in"):
        config.replace(strength=2.0)
    with pytest.raises(ConfigError, match="unknown setting"):
        config.replace(strenght=0.5)


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        StreamConfig().steps = 2  # type: ignore[misc]


def test_strength_must_leave_room_for_the_steps() -> None:
    with pytest.raises(ConfigError, match=r"strength must be at least steps / 1000 = 0.004 for 4 steps"):
        StreamConfig(steps=4, strength=0.001)
    assert StreamConfig(steps=4, strength=0.004).strength == 0.004
