"""The whole streaming model with every kernel forced on (Triton interpreter) == the torch path.

Two identical engines (random test-tiny CASA model, 2 sessions, ragged captions, several frames)
run the same stream: one with dispatch forced to torch, one forced to triton (attention, RMSNorm
(+residual), RoPE, through the interpreter). Every fed token's logits must agree, and so must the
greedy captions.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import numpy as np
import pytest
import torch
from conftest import KERNEL_DEVICE, assert_close

pytest.importorskip("triton")

from casa_live.kernels import dispatch
from casa_live.model.checkpoint.toy import toy_generation_config, toy_model, word_tokenizer
from casa_live.model.engine.engine import Engine, SessionSettings


def make_engine(fusion: str) -> Engine:
    model = toy_model("test-tiny", seed=1, fusion=fusion)
    with torch.no_grad():  # larger weights than the default init: attention far from uniform
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(std=0.15)
        model.lm.init_casa_from_self_attention()
    # compiled kernels on CUDA when a GPU is there and TRITON_INTERPRET=0; the interpreter on CPU otherwise
    return Engine(
        model,
        word_tokenizer(model.config.lm.vocab),
        toy_generation_config(),
        max_sessions=2,
        device=KERNEL_DEVICE,
    )


def stream_logits(engine: Engine, backend: str) -> tuple[list[torch.Tensor], list[int]]:
    """Logits of every fed token (in feed order) and every emitted token id."""
    logits: list[torch.Tensor] = []

    def observe(res):  # type: ignore[no-untyped-def]
        for r in sorted(res.fed):
            logits.extend(x.cpu() for x in res.fed_logits[r])

    engine.record_logits = True
    engine.observers.append(observe)
    rng = np.random.default_rng(0)
    tokens: list[int] = []
    with dispatch.force(backend), torch.no_grad():
        rows = [engine.open(p, SessionSettings(max_new_tokens=2)) for p in ("red circle", "what now")]
        for f in range(2):  # 2 frames x ragged captions: prefill, decode and window reset paths
            for i, row in enumerate(rows):
                engine.update(row, SessionSettings(max_new_tokens=1 + 2 * ((f + i) % 2)))
                engine.submit_frame(row, rng.integers(0, 256, (30, 41, 3), dtype=np.uint8))
            while any(engine.busy(r) for r in rows):
                tokens += [ev.token for ev in engine.step()]
        while engine.has_work():
            tokens += [ev.token for ev in engine.step()]
    return logits, tokens


@pytest.mark.parametrize("fusion", ["casa"])
def test_streaming_logits_triton_matches_torch(fusion: str) -> None:
    ref, ref_tokens = stream_logits(make_engine(fusion), "torch")
    out, out_tokens = stream_logits(make_engine(fusion), "triton")
    assert out_tokens == ref_tokens
    assert len(out) == len(ref) > 10
    assert_close(out, ref, torch.float32, f"logits of {len(ref)} fed tokens")
