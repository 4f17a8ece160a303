"""A session's generation settings and their bounds: the one source for the engine and the protocol.

Torch-free, so the wire protocol (server/protocol.py) imports it without the model. Every field is
optional: None means "the model's default" (its generation_config.json); `effective()` resolves
them against a GenerationConfig, which is what the engine samples with and what the server
echoes as a session's settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# The ranges the sampler computes safely, per setting (the protocol bounds client settings to the
# same numbers). Below MIN_TEMPERATURE the division of the logits overflows float32 and multinomial
# raises; seeds must fit torch's 64-bit generator; the penalty**count factor (count <= clamp) must
# stay finite; eos_bias multiplies (or divides, when negative) the stop logits, so it stays positive.
SETTING_BOUNDS: dict[str, tuple[float, float]] = {
    "max_new_tokens": (1, 256),
    "min_new_tokens": (0, 256),
    "temperature": (0.0, 5.0),
    "top_k": (0, 1 << 20),
    "repetition_penalty": (1.0, 10.0),
    "no_repeat_ngram": (0, 16),
    "seed": (0, (1 << 63) - 1),
    "top_p": (0.0, 1.0),
    "eos_bias": (0.01, 10.0),
}
TRUNCATED_CLOSE = ("last_stop", "cut_word")  # what closes a caption cut short (docs/engine.md)
MIN_TEMPERATURE = 0.01  # temperature is 0 (greedy) or at least this

# Settings without a generation-config field of the same name, and their defaults.
_NOT_IN_CONFIG = {"min_new_tokens": 0, "seed": 0}


@dataclass
class SessionSettings:
    max_new_tokens: int | None = None  # None: the model's generation_config default
    min_new_tokens: int | None = None  # stop tokens are banned until the caption has this many tokens
    temperature: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram: int | None = None
    seed: int | None = None
    top_p: float | None = None
    eos_bias: float | None = None
    truncated_close: str | None = None  # one of TRUNCATED_CLOSE

    def validate(self) -> SessionSettings:
        """Raise ValueError (naming the range) for a value the sampler cannot compute; returns self."""
        for name, (lo, hi) in SETTING_BOUNDS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {type(value).__name__}")
            if not lo <= value <= hi:  # also False for NaN
                raise ValueError(f"{name} is {value!r}; it must be between {lo:g} and {hi:g}")
        if self.truncated_close is not None and self.truncated_close not in TRUNCATED_CLOSE:
            raise ValueError(
                f"truncated_close is {self.truncated_close!r}; it must be one of {TRUNCATED_CLOSE}"
            )
        if self.temperature is not None and 0.0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(
                f"temperature is {self.temperature!r}; it must be 0 (greedy) or at least {MIN_TEMPERATURE}"
            )
        return self


SETTING_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SessionSettings))


def effective(gen: Any, settings: SessionSettings | None = None) -> dict[str, Any]:
    """Every setting's value for a session: its own where set, else the generation config's
    (`gen`: a GenerationConfig, read by field name), else the built-in default."""
    settings = settings or SessionSettings()
    out = {}
    for name in SETTING_NAMES:
        value = getattr(settings, name)
        if value is None:
            value = _NOT_IN_CONFIG[name] if name in _NOT_IN_CONFIG else getattr(gen, name)
        out[name] = value
    return out
