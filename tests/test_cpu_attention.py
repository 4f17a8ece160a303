"""The CPU decode attention kernel (kernels/cpu_attention.c) against its torch reference, the decode
step with it against the step without it, and how it is built, cached and turned off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ATOL, SAME_MATH_ATOL, assert_close

from casa_live.kernels import cpu_attention
from casa_live.kernels.dispatch import force, ragged_cpu_available, ragged_decode_attention_torch

ROOT = Path(__file__).resolve().parents[1]

needs_kernel = pytest.mark.skipif(
    cpu_attention.library() is None, reason="the C kernel does not build or run here (no cc, or no AVX2/FMA)"
)


def _case(B: int, H: int, Hkv: int, D: int, C: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g)
    keys = torch.randn(B + 3, Hkv, C, D, generator=g)
    values = torch.randn(B + 3, Hkv, C, D, generator=g)
    rows = torch.randperm(B + 3, generator=g)[:B]
    # disjoint ranges [0, a) and [b0, b1): lengths from 0 (nothing visible) to the whole buffer
    a = torch.randint(0, C // 2, (B,), generator=g)
    b0 = torch.randint(C // 2, C, (B,), generator=g)
    b1 = torch.minimum(b0 + torch.randint(0, C // 2, (B,), generator=g), torch.tensor(C))
    a[0], b1[0] = 0, b0[0]  # entry 0 sees nothing
    a[-1], b0[-1], b1[-1] = C // 2, C // 2, C  # the last sees every slot
    return q, keys, values, rows, a, b0, b1


@needs_kernel
@pytest.mark.parametrize(
    ("H", "Hkv", "D"),
    [(3, 3, 64), (4, 2, 64), (6, 2, 32), (2, 1, 128), (8, 8, 16)],  # the bundled model, GQA, other sizes
)
def test_kernel_matches_reference(H: int, Hkv: int, D: int) -> None:
    q, keys, values, rows, a, b0, b1 = _case(9, H, Hkv, D, C=70)
    out = cpu_attention.ragged_decode_attention(q, keys, values, rows, a, b0, b1, D**-0.5)
    ref = ragged_decode_attention_torch(q, keys, values, rows, a, b0, b1, D**-0.5)
    assert_close(out, ref, torch.float32, "kernel vs torch", atol=SAME_MATH_ATOL)
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # nothing visible: zeros, not NaN
    # the reference is what it says: a dense softmax over exactly the visible slots of the row
    b = 3
    k, v = keys[rows[b]], values[rows[b]]
    sel = torch.cat([torch.arange(0, int(a[b])), torch.arange(int(b0[b]), int(b1[b]))])
    G = H // Hkv
    for h in range(H):
        p = torch.softmax(k[h // G, sel] @ q[b, h, 0] * D**-0.5, 0)
        assert_close(ref[b, h * D : (h + 1) * D], p @ v[h // G, sel], torch.float32, atol=SAME_MATH_ATOL)


@needs_kernel
def test_kernel_reads_strided_queries_and_a_layer_of_a_larger_buffer() -> None:
    """What the decode step passes: q a slice of the fused projection (not contiguous across
    entries), keys one layer of a (L, Bmax, Hkv, C, D) cache."""
    qk = torch.randn(5, 3 + 3, 1, 64)
    cache_k, cache_v = torch.randn(2, 6, 3, 40, 64), torch.randn(2, 6, 3, 40, 64)
    rows, a = torch.tensor([4, 0, 2, 5, 1]), torch.tensor([40, 1, 17, 3, 29])
    z = torch.zeros(5, dtype=torch.long)
    out = cpu_attention.ragged_decode_attention(qk[:, :3], cache_k[1], cache_v[1], rows, a, z, z, 0.125)
    ref = ragged_decode_attention_torch(qk[:, :3].contiguous(), cache_k[1], cache_v[1], rows, a, z, z, 0.125)
    assert_close(out, ref, torch.float32, atol=SAME_MATH_ATOL)


@needs_kernel
def test_kernel_rejects_a_row_outside_the_buffer() -> None:
    q, keys, values, rows, a, b0, b1 = _case(4, 3, 3, 64, C=20)
    rows[2] = keys.shape[0]
    with pytest.raises(IndexError, match="outside the cache"):
        cpu_attention.ragged_decode_attention(q, keys, values, rows, a, b0, b1, 0.125)
    # ranges past the buffer are clamped to it, never read beyond it
    rows[2] = 0
    big = cpu_attention.ragged_decode_attention(q, keys, values, rows, a, b0, b1 + 1000, 0.125)
    clamped = cpu_attention.ragged_decode_attention(
        q, keys, values, rows, a, b0, (b1 + 1000).clamp(max=20), 0.125
    )
    assert torch.equal(big, clamped)


@needs_kernel
def test_registered_op_takes_the_kernel_unless_torch_is_forced() -> None:
    q, keys, values, rows, a, b0, b1 = _case(6, 3, 3, 64, C=50)
    op = torch.ops.casa.ragged_decode_attention
    fast = op(q, keys, values, rows, a, b0, b1, 0.125)
    assert torch.equal(fast, cpu_attention.ragged_decode_attention(q, keys, values, rows, a, b0, b1, 0.125))
    with force("torch"):
        assert not ragged_cpu_available()
        slow = op(q, keys, values, rows, a, b0, b1, 0.125)
    assert torch.equal(slow, ragged_decode_attention_torch(q, keys, values, rows, a, b0, b1, 0.125))


@needs_kernel
def test_decode_step_with_the_kernel_matches_the_step_without() -> None:
    """The bundled model streaming real frames: every fed token's logits with the ragged kernel
    (and entries exactly the working rows) equal the bias-and-segments path's, and so do the
    captions; the cache tensors keep their storage (no cache-sized copy per step)."""
    from casa_live.model.engine.engine import Engine

    def run(ragged: bool):
        eng = Engine.from_checkpoint(ROOT / "checkpoints" / "default", max_sessions=6)
        logits: dict[int, list[torch.Tensor]] = {}
        eng.record_logits = True
        eng.observers.append(
            lambda res: [
                logits.setdefault(r, []).extend(x.clone() for x in res.fed_logits[r]) for r in res.fed
            ]
        )
        ptrs = [
            t.data_ptr() for t in (eng.state.text.k, eng.state.text.v, eng.state.casa.k, eng.state.casa.v)
        ]
        rng = np.random.default_rng(0)
        # rows 1, 3, 4 stream (idle rows between them); 0, 2, 5 stay open and idle
        rows = [eng.open() for _ in range(6)]
        text = {r: "" for r in rows}
        with force(None if ragged else "torch"):
            for _ in range(5):
                for r in (rows[1], rows[3], rows[4]):
                    eng.submit_frame(r, rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
                while eng.has_work():
                    for ev in eng.step():
                        text[ev.row] += ev.text
        after = [
            t.data_ptr() for t in (eng.state.text.k, eng.state.text.v, eng.state.casa.k, eng.state.casa.v)
        ]
        assert after == ptrs
        return logits, text

    fast, fast_text = run(True)
    slow, slow_text = run(False)
    assert fast_text == slow_text and any(fast_text.values())
    assert fast.keys() == slow.keys()
    assert sum(len(v) for v in fast.values()) > 60
    for r in fast:
        assert len(fast[r]) == len(slow[r])
        assert_close(fast[r], slow[r], torch.float32, f"row {r}")  # relative: logits reach ~20


@needs_kernel
@pytest.mark.parametrize(("fusion", "shared"), [("casa", False), ("casa", True), ("insertion", False)])
def test_decode_layers_in_c_match_the_torchscript_layers(fusion: str, shared: bool, monkeypatch) -> None:
    """A few rows: every layer in one C call (model/decode.py C_STEP_ROWS) == the TorchScript
    layers, over frames, ragged captions and idle rows between working ones (test-tiny: GQA, a
    layer without CASA): the same tokens, every fed token's logits and the caches within fp32
    rounding."""
    import casa_live.model.decode as decode
    from casa_live.model.checkpoint.toy import toy_generation_config, toy_model, word_tokenizer
    from casa_live.model.engine.engine import Engine, SessionSettings

    def run(c_rows: int):  # type: ignore[no-untyped-def]
        monkeypatch.setattr(decode, "C_STEP_ROWS", c_rows)
        model = toy_model("test-tiny", seed=1, fusion=fusion, shared=shared)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(std=0.15)
            model.lm.init_casa_from_self_attention()
        eng = Engine(model, word_tokenizer(model.config.lm.vocab), toy_generation_config(), max_sessions=5)
        eng.record_logits = True
        fed: dict[int, list[torch.Tensor]] = {}
        eng.observers.append(
            lambda res: [fed.setdefault(r, []).extend(x.clone() for x in res.fed_logits[r]) for r in res.fed]
        )
        rng = np.random.default_rng(2)
        rows = [eng.open(p) for p in ("red circle", "hi", "what now", "a", "blue")]
        tokens: dict[int, list[int]] = {r: [] for r in rows}
        for f in range(4):
            for i, r in enumerate(rows):
                if (f + i) % 3:  # rows 0 and 3 idle in some frames: gaps between the working rows
                    eng.update(r, SessionSettings(max_new_tokens=1 + (f + i) % 4))
                    eng.submit_frame(r, rng.integers(0, 256, (30, 41, 3), dtype=np.uint8))
            while eng.has_work():
                for ev in eng.step():
                    tokens[ev.row].append(ev.token)
        caches = [eng.state.text.k, eng.state.text.v] + (
            [eng.state.casa.k, eng.state.casa.v] if eng.state.casa is not None else []
        )
        return tokens, fed, [c.clone() for c in caches], "_c_layers" in model.lm.__dict__

    ref_tokens, ref, ref_caches, ref_used = run(0)
    out_tokens, out, out_caches, used = run(12)
    assert used and not ref_used  # the C layers ran, and only where asked
    assert out_tokens == ref_tokens and sum(len(t) for t in out_tokens.values()) > 10
    assert out.keys() == ref.keys()
    for r in out:
        assert_close(out[r], ref[r], torch.float32, f"row {r}", atol=ATOL)
    assert_close(out_caches, ref_caches, torch.float32, "caches", atol=ATOL)


@needs_kernel
def test_build_is_cached_by_source(tmp_path: Path) -> None:
    first = cpu_attention.build(into=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cpu_attention.build(into=tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left behind
    assert first.stat().st_mode & 0o005 == 0o005  # other users load it (the image builds as root)


def test_without_the_kernel_the_torch_path_runs(tmp_path: Path) -> None:
    """CASA_CPU_KERNELS=0, or a compiler that fails with an empty cache: no kernel, a logged
    reason, and the decode step still runs (on the torch path)."""
    probe = (
        "import logging, torch; logging.basicConfig(level=logging.INFO)\n"
        "from casa_live.kernels import cpu_attention, dispatch\n"
        "assert cpu_attention.library() is None and not dispatch.ragged_cpu_available()\n"
        "q, k = torch.randn(2, 3, 1, 64), torch.randn(2, 3, 8, 64)\n"
        "n = torch.tensor([8, 3]); z = torch.zeros(2, dtype=torch.long)\n"
        "out = torch.ops.casa.ragged_decode_attention(q, k, k, torch.arange(2), n, z, z, 0.125)\n"
        "assert out.shape == (2, 192) and bool(out.isfinite().all())\n"
    )
    env = {**os.environ, "CASA_KERNEL_CACHE": str(tmp_path)}
    off = subprocess.run(
        [sys.executable, "-c", probe], env={**env, "CASA_CPU_KERNELS": "0"}, capture_output=True, text=True
    )
    assert off.returncode == 0, off.stderr
    assert "disabled" in off.stderr
    no_cc = subprocess.run(
        [sys.executable, "-c", probe],
        env={**env, "CC": str(tmp_path / "no-such-cc")},
        capture_output=True,
        text=True,
    )
    assert no_cc.returncode == 0, no_cc.stderr
    assert ("could not build" if cpu_attention.cpu_supported() else "no AVX2") in no_cc.stderr
