"""Our streaming engine vs transformers' Qwen2.5-VL with its own KV cache, same weights, CPU.

One random Qwen2.5-VL is saved with transformers' `save_pretrained` and imported through our
importer (model/checkpoint/hf), so both sides run the same backbone weights; ours adds CASA layers (initialised
from self-attention) and streams the Kyutai way, transformers does what a Qwen2.5-VL user does for a
live stream: token insertion, each frame's `<|vision_start|><|image_pad|>*N<|vision_end|>` appended
turn by turn to one DynamicCache, then greedy decoding. Every frame is run for real on both sides.

Per frame: vision tower + prefill + `--tokens` forced decode steps (+ closing the previous caption).
Memory is the KV cache in use (ours: text cache + the CASA layers' image/window K/V; transformers:
its DynamicCache tensors).

    python -m benchmarks.bench_transformers                        # frames 16 64 256
    python -m benchmarks.bench_transformers --frames 8 16 --tokens 4   # quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from benchmarks.bench_streaming import used_kv_bytes
from casa_live.model.checkpoint.load import load
from casa_live.model.engine.engine import Engine, SessionSettings

SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
]


def hf_config(vocab: int):
    import transformers

    return transformers.Qwen2_5_VLConfig(
        vision_config=dict(
            depth=2,
            hidden_size=128,
            intermediate_size=256,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            window_size=112,
            out_hidden_size=256,
            fullatt_block_indexes=[1],
        ),
        text_config=dict(
            vocab_size=vocab,
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
            tie_word_embeddings=True,
        ),
        tie_word_embeddings=True,
        image_token_id=SPECIAL.index("<|image_pad|>"),
        vision_start_token_id=SPECIAL.index("<|vision_start|>"),
        vision_end_token_id=SPECIAL.index("<|vision_end|>"),
    )


def write_checkpoint(path: Path, vocab: int, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(hf_config(vocab)).eval()
    hf.save_pretrained(path)
    names = SPECIAL + ["<unk>"] + [f"w{i}" for i in range(vocab - len(SPECIAL) - 1)]
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL)
    tok.save(str(path / "tokenizer.json"))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return hf


def hf_kv_bytes(cache) -> int:
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


class HFStream:
    """transformers' Qwen2.5-VL streaming a video by token insertion into its own DynamicCache."""

    def __init__(self, hf, prompt: list[int], grid: tuple[int, int], tokens: int) -> None:
        from transformers import DynamicCache

        self.hf, self.grid, self.tokens = hf, grid, tokens
        self.cache = DynamicCache(config=hf.config)
        self.pos = 0
        self.pending = list(prompt)
        self.kv_tokens = 0

    def _positions(self, items: list[str]) -> torch.Tensor:
        """Qwen2.5-VL M-RoPE ids (3, 1, L): text +1; a frame at p takes (p, p+row, p+col), then
        text resumes at p + max(gh, gw) (get_rope_index for one still frame)."""
        gh, gw = self.grid
        out = []
        for it in items:
            if it == "img":
                p = self.pos
                r = torch.arange(gh).repeat_interleave(gw)
                c = torch.arange(gw).repeat(gh)
                out.append(torch.stack([torch.full_like(r, p), p + r, p + c]))
                self.pos += max(gh, gw)
            else:
                out.append(torch.full((3, 1), self.pos))
                self.pos += 1
        return torch.cat(out, 1)[:, None, :]

    @torch.no_grad()
    def frame(self, pixel_rows: torch.Tensor, patch_grid: tuple[int, int]) -> None:
        gh, gw = self.grid
        ids = [*self.pending, SPECIAL.index("<|vision_start|>")]
        ids += [SPECIAL.index("<|image_pad|>")] * (gh * gw) + [SPECIAL.index("<|vision_end|>")]
        items = ["txt"] * (len(self.pending) + 1) + ["img"] + ["txt"]
        out = self.hf(
            input_ids=torch.tensor([ids]),
            pixel_values=pixel_rows,
            image_grid_thw=torch.tensor([[1, *patch_grid]]),
            position_ids=self._positions(items),
            cache=self.cache,
            use_cache=True,
        )
        tok = int(out.logits[0, -1].argmax())
        for _ in range(self.tokens - 1):
            out = self.hf(
                input_ids=torch.tensor([[tok]]),
                position_ids=self._positions(["txt"]),
                cache=self.cache,
                use_cache=True,
            )
            tok = int(out.logits[0, -1].argmax())
        self.pending = [tok, SPECIAL.index("<|im_end|>")]  # the last token and the stop token: next turn
        self.kv_tokens = self.cache.get_seq_length()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--tokens", type=int, default=8, help="forced caption tokens per frame")
    ap.add_argument("--image-size", type=int, default=224, help="frame side (224 -> 64 image tokens)")
    ap.add_argument("--repeat", type=int, default=3, help="frames averaged (median) at each point")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: the shared dev CPU thrashes with more)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    vocab = 4096
    last = max(args.frames)
    with tempfile.TemporaryDirectory() as tmp:
        hf = write_checkpoint(Path(tmp), vocab)
        model, tok, gen = load(tmp)
    model.config.image_size = args.image_size
    gen.template.prefix, gen.template.caption_prefix = "<|im_start|>", ""
    engine = Engine(model, tok, gen, max_sessions=1, max_context_tokens=4096, branch_rows=0)
    settings = SessionSettings(max_new_tokens=args.tokens, min_new_tokens=args.tokens, temperature=0.0)
    row = engine.open(None, settings)
    image = np.random.default_rng(0).integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8)
    patches = engine.processor(image)
    side = args.image_size // 14
    pixel_rows = patches.view(-1, 3, 1, 196).expand(-1, 3, 2, 196).reshape(side * side, -1)
    stream = HFStream(hf, engine.prompt_ids(None)[:-1], model.grid, args.tokens)

    ours_ms, hf_ms, rows = [], [], []
    for f in range(1, last + 1):
        t0 = time.perf_counter()
        for _ in engine.caption(row, image):
            pass
        while engine.has_work():
            engine.step()
        ours_ms.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        stream.frame(pixel_rows, (side, side))
        hf_ms.append((time.perf_counter() - t0) * 1e3)
        if f in args.frames:
            k = min(args.repeat, f)
            rows.append(
                (
                    f,
                    statistics.median(ours_ms[-k:]),
                    statistics.median(hf_ms[-k:]),
                    used_kv_bytes(engine, row),
                    hf_kv_bytes(stream.cache),
                    engine.kv_tokens(row),
                    stream.kv_tokens,
                )
            )
            print(f"frame {f}: ours {rows[-1][1]:.1f} ms, transformers {rows[-1][2]:.1f} ms", flush=True)

    import transformers

    print(
        f"\n# bench_transformers: hidden 256, 4 layers, vision depth 2, {model.config.image_tokens} image "
        f"tokens/frame ({args.image_size}px), {args.tokens} tokens/frame, fp32, threads={torch.get_num_threads()}, "
        f"cpu={platform.processor() or platform.machine()}, transformers {transformers.__version__}"
    )
    print(
        "| frame | ours ms | transformers ms | latency ratio | ours KV MiB | transformers KV MiB | memory ratio "
        "| ours KV tokens | transformers KV tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for f, o, h, ob, hb, ot, ht in rows:
        print(
            f"| {f} | {o:.1f} | {h:.1f} | {o / h:.2f}x | {ob / 2**20:.2f} | {hb / 2**20:.2f} | {ob / hb:.3f}x "
            f"| {ot} | {ht} |"
        )


if __name__ == "__main__":
    main()
