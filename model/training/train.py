"""Train a CASA model end to end on the synthetic world (model/world/scene.py), on CPU.

Design choices:
- Sequences follow the exact streaming layout of model/engine/engine.py (Engine), so the model is trained
  on what it sees when it captions live:
      prefix(prompt) pre_image | frame 0 | post_image caption_prefix caption_0 stop
      pre_image | frame 1 | post_image caption_1 stop  pre_image | frame 2 | ...
  Frame f is inserted right before its post_image tokens; the stop token and the next pre_image
  close frame f's window (the engine feeds them before the next frame resets the CASA state).
- The forward is `CASAModel.forward_dense` (the dense block-mask semantics of CASA windows, or the
  token-insertion baseline for --fusion insertion), so training runs the serving model's code unchanged.
- Loss: next-token cross-entropy on caption tokens and their stop token only.
- Data is generated on the fly from seeds >= TRAIN_SEED_BASE; evaluation uses seeds below it, so a
  held-out clip can never be a training clip. Step s always sees the same clips (resume-safe).
- AdamW, linear warmup then cosine decay to 10%; gradient clipping at 1.0.
- Checkpoints: `train_state.pt` (model, optimizer, step) for --resume, and an exported checkpoint
  directory in our format (weights stored in float16 to keep the shipped model small).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from casa_live.model.checkpoint.format import save_checkpoint
from casa_live.model.config import GenerationConfig, ModelConfig, preset
from casa_live.model.processor import ImageProcessor
from casa_live.model.reference import Interleaved
from casa_live.model.tokenizer import Tokenizer
from casa_live.model.training.text import (
    PROMPTS,
    generation_config,
    init_new_tokens,
    stream_layout,
    train_tokenizer,
    with_qa_tokens,
)
from casa_live.model.vlm import CASAModel
from casa_live.model.world.questions import sample as sample_question
from casa_live.model.world.scene import (
    COLOURS,
    COLS,
    ROWS,
    SHAPES,
    SIZES,
    TRAIN_SEED_BASE,
    VAL_SEED_BASE,
    Clip,
    FrameTruth,
    WorldConfig,
    generate_clip,
)

log = logging.getLogger("casa.train")

COLOUR_IDS = {c: i for i, c in enumerate(COLOURS)}
SHAPE_IDS = {c: i for i, c in enumerate(SHAPES)}
SIZE_IDS = {c: i for i, c in enumerate(SIZES)}


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, T) long
    target: torch.Tensor  # (B, T) bool
    text_len: torch.Tensor  # (B,)
    insert_at: torch.Tensor  # (B, F)
    n_frames: torch.Tensor  # (B,)
    patches: torch.Tensor  # (sum F, patches, C*P*P) of the real frames, row-major over the batch
    token_labels: torch.Tensor  # (sum F, N, 3) long: colour, shape, size under each image token (0 = none)
    answer: torch.Tensor | None = None  # (B, T) bool: answer tokens (a subset of target)


def make_batch(
    seeds: list[int],
    tok: Tokenizer,
    gen: GenerationConfig,
    processor: ImageProcessor,
    world: WorldConfig,
    frames: list[int],
    prompts: list[str | None],
    questions: bool = False,
    qa_weights: dict[str, float] | None = None,
    qa_hard_negatives: float = 0.0,
) -> Batch:
    """questions: each clip's sequence ends with a question about its last frame on a branch
    (one question a clip, drawn from the clip's seed so a step always sees the same ones; its
    kind in proportion to `qa_weights`, uniform when None; `qa_hard_negatives`: see
    model/world/questions.py `sample`)."""
    clips = [
        generate_clip(seed, WorldConfig(**{**asdict(world), "frames": n})) for seed, n in zip(seeds, frames)
    ]
    qa = None
    if questions:
        qa = [
            sample_question(
                c.truth[-1].objects,
                np.random.default_rng([c.seed, 17]),
                weights=qa_weights,
                hard_negatives=qa_hard_negatives,
            )
            for c in clips
        ]
        qa = [(q.text, q.answer) for q in qa]
    return batch_from_clips(clips, tok, gen, processor, prompts, qa)


def batch_from_clips(
    clips: list[Clip],
    tok: Tokenizer,
    gen: GenerationConfig,
    processor: ImageProcessor,
    prompts: list[str | None],
    qa: list[tuple[str, str]] | None = None,
) -> Batch:
    """The padded training batch of these clips in the engine's stream layout (each followed by
    its question branch when `qa` gives one per clip)."""
    seqs, patches, labels = [], [], []
    side = processor.image_size // (processor.patch * processor.merge)
    grid = (side, side)
    for k, (clip, prompt) in enumerate(zip(clips, prompts)):
        seqs.append(stream_layout(tok, gen, clip.captions, prompt, None if qa is None else qa[k]))
        patches += [processor(f) for f in clip.frames]
        labels += [token_labels(t, grid) for t in clip.truth]
    frames = [len(s.insert_at) for s in seqs]
    B, T, Fm = len(seqs), max(len(s.tokens) for s in seqs), max(frames)
    pad = tok.token_id("<|pad|>")
    tokens = torch.full((B, T), pad, dtype=torch.long)
    target = torch.zeros(B, T, dtype=torch.bool)
    answer = torch.zeros(B, T, dtype=torch.bool)
    insert_at = torch.zeros(B, Fm, dtype=torch.long)
    for b, s in enumerate(seqs):
        tokens[b, : len(s.tokens)] = torch.tensor(s.tokens)
        target[b, : len(s.target)] = torch.tensor(s.target)
        answer[b, : len(s.answer)] = torch.tensor(s.answer)
        insert_at[b, : len(s.insert_at)] = torch.tensor(s.insert_at)
    return Batch(
        tokens,
        target,
        torch.tensor([len(s.tokens) for s in seqs]),
        insert_at,
        torch.tensor(frames),
        torch.stack(patches),
        torch.stack(labels),
        answer if qa is not None else None,
    )


def token_labels(truth: FrameTruth, grid: tuple[int, int]) -> torch.Tensor:
    """(N, 3) long: the colour, shape and size class (1-based; 0 = background) of the object under
    each merged image token: tokens whose centre lies inside the object's disc, and always the token
    nearest to the object's centre."""
    gh, gw = grid
    out = torch.zeros(gh * gw, 3, dtype=torch.long)
    ys = (torch.arange(gh, dtype=torch.float32) + 0.5) / gh
    xs = (torch.arange(gw, dtype=torch.float32) + 0.5) / gw
    dist = None
    for obj in truth.objects:
        dist = ((ys[:, None] - obj.cy) ** 2 + (xs[None, :] - obj.cx) ** 2).sqrt().reshape(-1)  # (N,)
        inside = dist < obj.diameter / 2
        inside[int(dist.argmin())] = True
        cls = torch.tensor(
            [COLOUR_IDS[obj.colour] + 1, SHAPE_IDS[obj.shape] + 1, SIZE_IDS[obj.size] + 1], dtype=torch.long
        )
        out[inside] = cls
    return out


class VisionProbe(torch.nn.Module):
    """Training-only auxiliary heads: dense supervision of the vision tower's image tokens.

    A caption says an object's colour and shape in one or two tokens, so the vision tower, trained
    from scratch through CASA attention alone, learns shapes slowly. This linear probe asks every
    image token what lies under it (colour, shape, size), which gives the tower a direct signal
    (`weight`). With `position` > 0 a second linear head asks every image token where it lies (the
    row and the column of the scene's 3 x 3 grid): on a plain background only the vision position
    table (VisionConfig.abs_pos) can answer, so this gives the table a direct signal where the
    language model's loss gives it almost none (docs/training.md). Neither head is part of the
    model: the exported checkpoint never contains them.
    """

    def __init__(self, hidden: int, weight: float = 0.5, position: float = 0.0) -> None:
        super().__init__()
        self.weight, self.position = weight, position
        self.head = torch.nn.Linear(hidden, len(COLOUR_IDS) + 1 + len(SHAPE_IDS) + 1 + len(SIZE_IDS) + 1)
        # the position head exists only when its loss does: a run without it keeps the same
        # parameters (and random draws) as before it existed
        self.where = torch.nn.Linear(hidden, len(ROWS) + len(COLS)) if position else None

    def loss(
        self, images: torch.Tensor, labels: torch.Tensor, table: torch.Tensor | None = None
    ) -> torch.Tensor:
        """images (sum F, N, hidden) of square grids, labels (sum F, N, 3) -> the weighted sum of
        the mean CE over colour (every token), shape and size (object tokens only), and of the
        mean CE over each token's row and column. `table` (N, hidden): the position table's share
        of the image tokens; the position loss then trains the table alone (the tower's output
        is detached from it), so it cannot bend the tower's features away from what the
        language model reads."""
        loss = images.new_zeros((), dtype=torch.float32)
        if self.weight:
            loss = loss + self.weight * self._what(images, labels)
        if self.where is not None:
            where_in = images if table is None else images.detach() + (table - table.detach())
            loss = loss + self.position * self._where(where_in)
        return loss

    def _what(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.head(images.float())
        c, s = len(COLOUR_IDS) + 1, len(SHAPE_IDS) + 1
        lc, ls, lz = logits[..., :c], logits[..., c : c + s], logits[..., c + s :]
        obj = labels[..., 0] > 0
        loss = F.cross_entropy(lc.reshape(-1, c), labels[..., 0].reshape(-1))
        if obj.any():
            loss = (
                loss
                + F.cross_entropy(ls[obj], labels[..., 1][obj])
                + F.cross_entropy(lz[obj], labels[..., 2][obj])
            )
        return loss

    def _where(self, images: torch.Tensor) -> torch.Tensor:
        assert self.where is not None
        side = math.isqrt(images.shape[1])
        cell = cell_of_tokens(side).to(images.device)  # (N, 2)
        logits = self.where(images.float())  # (sum F, N, rows + cols)
        nr = len(ROWS)
        rows = F.cross_entropy(logits[..., :nr].reshape(-1, nr), cell[:, 0].repeat(images.shape[0]))
        cols = F.cross_entropy(logits[..., nr:].reshape(-1, len(COLS)), cell[:, 1].repeat(images.shape[0]))
        return rows + cols


def cell_of_tokens(side: int) -> torch.Tensor:
    """(side * side, 2) long: the scene-grid row and column (model/world/scene.py ROWS, COLS) under
    the centre of each token of a side x side image-token grid, in raster order."""
    centre = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    row = (centre * len(ROWS)).long()  # (side,)
    col = (centre * len(COLS)).long()
    return torch.stack([row[:, None].expand(side, side), col[None, :].expand(side, side)], -1).reshape(-1, 2)


def dense_logits(model: CASAModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced logits (B, T, V) of the batch's text (the dense CASA semantics), and the image
    tokens (sum F, N, hidden) of its real frames."""
    images = model.encode_images(batch.patches)  # (sum F, N, hidden), each frame encoded once
    B, Fm = batch.insert_at.shape
    padded = images.new_zeros(B, Fm, *images.shape[1:])
    real = torch.arange(Fm)[None, :] < batch.n_frames[:, None]  # (B, F)
    padded[real] = images
    inter = Interleaved(batch.tokens, batch.text_len, padded, batch.n_frames, batch.insert_at, model.grid)
    return model.forward_dense(inter), images


def caption_loss(
    model: CASAModel, batch: Batch, probe: VisionProbe | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross-entropy over caption tokens (plus the probe's auxiliary vision loss when given);
    stats: caption token count, teacher-forced token accuracy, the two losses."""
    logits, images = dense_logits(model, batch)
    pred_mask = batch.target[:, 1:]  # logits at t predict token t + 1
    logits = logits[:, :-1][pred_mask].float()
    labels = batch.tokens[:, 1:][pred_mask]
    loss = F.cross_entropy(logits, labels)
    hit = logits.argmax(-1) == labels
    acc = hit.float().mean().item()
    stats = {"tokens": int(labels.numel()), "acc": acc, "caption_loss": loss.item()}
    if batch.answer is not None:  # teacher-forced accuracy on the answers (and their stop) alone
        is_answer = batch.answer[:, 1:][pred_mask]
        stats["answer_acc"] = hit[is_answer].float().mean().item() if is_answer.any() else 0.0
    if probe is not None:
        table = None
        if probe.where is not None and model.vision.pos_embed is not None:
            side = math.isqrt(images.shape[1]) * model.config.vision.merge  # the patch grid's side
            table = model.vision.positions((side, side))
        aux = probe.loss(images, batch.token_labels, table)
        stats["vision_loss"] = aux.item()
        loss = loss + aux
    return loss, stats


# ---------------------------------------------------------------- the loop


@dataclass
class TrainConfig:
    preset: str = "default"
    fusion: str = "casa"
    steps: int = 2000
    batch: int = 8  # clips per step
    min_frames: int = 6
    max_frames: int = 16  # = `casa eval`'s clip length
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    image_size: int | None = None  # None: the preset's
    vocab: int | None = None  # None: the preset's (tiny test presets need room for the BPE tokenizer)
    log_every: int = 10
    save_every: int = 200
    val_every: int = 100
    val_clips: int = 16
    threads: int = 2
    vision_probe: bool = True  # auxiliary dense vision loss (VisionProbe); training only
    # weight of the probe's position loss (VisionProbe.position; 0: none); it runs even without
    # `vision_probe`, which turns off only the colour / shape / size loss
    position_probe: float = 0.0
    time_budget_s: float | None = None  # stop (and export) after this much wall time
    world: dict = field(default_factory=dict)  # WorldConfig overrides (size follows the model)
    # fine-tuning: start from this checkpoint's weights and tokenizer instead of random weights
    init: str | None = None
    questions: bool = False  # each clip ends with a question branch (model/world/questions.py)
    # With questions: this many more short clips per step (1..qa_frames frames, one length a step),
    # each ending with a question: more answers per step for little vision work (an answer depends
    # on its frame, and the frame's window, not on a long history).
    qa_clips: int = 0
    qa_frames: int = 3
    # question kind -> relative weight in training (missing kinds weigh 1): more of the kinds the
    # model answers worst
    qa_weights: dict[str, float] = field(default_factory=dict)
    # share of the questions' random subjects drawn as near misses (questions.sample)
    qa_hard_negatives: float = 0.0
    # give the vision tower a table of absolute positions of this side (VisionConfig.abs_pos); None
    # keeps the preset's or the --init checkpoint's. A fine-tune that adds it starts it at zero.
    abs_pos: int | None = None
    # the position table learns this many times faster than the rest: it starts at zero, and a
    # fine-tune's LR is small
    abs_pos_lr_scale: float = 10.0


def model_config(cfg: TrainConfig) -> ModelConfig:
    mc = preset(cfg.preset)
    mc.casa.fusion = cfg.fusion  # type: ignore[assignment]
    if cfg.image_size is not None:
        mc.image_size = cfg.image_size
    if cfg.vocab is not None:
        mc.lm.vocab = cfg.vocab
    if cfg.fusion != "casa":
        mc.name = f"{mc.name}-{cfg.fusion}"
    return mc


def lr_at(cfg: TrainConfig, step: int, elapsed_s: float = 0.0) -> float:
    """Linear warmup, then cosine decay over whichever runs out first: steps or the time budget."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    if cfg.time_budget_s:
        p = max(p, min(1.0, elapsed_s / cfg.time_budget_s))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def step_clips(cfg: TrainConfig, step: int) -> tuple[list[int], list[int], list[str | None]]:
    """The (seeds, frame counts, prompts) of training step `step`: a pure function of the step."""
    rng = np.random.default_rng([cfg.seed, step])
    seeds = [TRAIN_SEED_BASE + (cfg.seed * 7919 + step) * cfg.batch + i for i in range(cfg.batch)]
    # one clip length per step: no padded frames, so no CASA work is wasted on padding
    frames = [int(rng.integers(cfg.min_frames, cfg.max_frames + 1))] * cfg.batch
    prompts: list[str | None] = [
        None if (k := int(rng.integers(len(PROMPTS) + 2))) >= len(PROMPTS) else PROMPTS[k]
        for _ in range(cfg.batch)
    ]
    return seeds, frames, prompts


def qa_step_clips(cfg: TrainConfig, step: int) -> tuple[list[int], list[int], list[str | None]]:
    """The short question clips of training step `step` (seeds apart from step_clips')."""
    rng = np.random.default_rng([cfg.seed, step, 1])
    base = TRAIN_SEED_BASE + 500_000_000 + (cfg.seed * 7919 + step) * cfg.qa_clips
    n = int(rng.integers(1, cfg.qa_frames + 1))
    return [base + i for i in range(cfg.qa_clips)], [n] * cfg.qa_clips, [None] * cfg.qa_clips


def export(model: CASAModel, tok: Tokenizer, gen: GenerationConfig, path: str | Path) -> Path:
    """Write our checkpoint format with float16 weights (loaders upcast to the serving dtype)."""
    half = copy.deepcopy(model).to(torch.float16)
    save_checkpoint(path, half, tok, gen)
    return Path(path)


def with_abs_pos(model: CASAModel, side: int) -> CASAModel:
    """The same model with a vision position table of this side (VisionConfig.abs_pos), the
    weights it shares copied: a new table is zero, so the model computes what it did."""
    mc = copy.deepcopy(model.config)
    mc.vision.abs_pos = side
    out = CASAModel(mc)
    missing, unexpected = out.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(k != "vision.pos_embed" for k in missing):
        raise ValueError(f"cannot add a position table: missing {missing}, unexpected {unexpected}")
    return out


def train(cfg: TrainConfig, out: str | Path, resume: bool = False) -> dict:
    """Train; returns a summary. Writes out/train_state.pt, out/train_log.jsonl and the checkpoint."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    state_path = out / "train_state.pt"
    mc = model_config(cfg)
    tok_path = out / "tokenizer.json"
    init = None
    if cfg.init is not None:  # fine-tuning: the checkpoint's model config, weights and tokenizer
        from casa_live.model.checkpoint.format import load_casa_checkpoint

        init, init_tok, _ = load_casa_checkpoint(cfg.init, "cpu", torch.float32)
        mc = init.config
        if cfg.abs_pos is not None and cfg.abs_pos != mc.vision.abs_pos:
            init = with_abs_pos(init, cfg.abs_pos)
            mc = init.config
    elif cfg.abs_pos is not None:
        mc.vision.abs_pos = cfg.abs_pos
    if resume and tok_path.exists():
        tok = Tokenizer.from_file(tok_path)
    elif cfg.init is not None:
        tok = init_tok
    else:
        tok = train_tokenizer(mc.lm.vocab)
    if cfg.questions:
        if cfg.fusion == "insertion":  # its branch is a plain copy; the layout re-opens a CASA window
            raise ValueError("--questions trains CASA models (fusion casa or ca), not token insertion")
        tok = with_qa_tokens(tok)
        if init is not None and not resume:
            init_new_tokens(init, init_tok, tok)
    if tok.vocab_size > mc.lm.vocab:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens; the model's vocabulary is {mc.lm.vocab}")
    gen = generation_config(qa=cfg.questions)
    model = init if init is not None else CASAModel.random(mc, seed=cfg.seed)
    if cfg.position_probe and not mc.vision.abs_pos:
        raise ValueError("--position-probe trains the vision position table: give --abs-pos too")
    probe = None
    if cfg.vision_probe or cfg.position_probe:
        probe = VisionProbe(mc.lm.hidden, 0.5 if cfg.vision_probe else 0.0, cfg.position_probe)
    pos = model.vision.pos_embed
    rest = [p for p in model.parameters() if p is not pos]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    if pos is not None:  # its own group: no weight decay towards zero, a faster LR (lr_scale)
        opt.add_param_group({"params": [pos], "weight_decay": 0.0, "lr_scale": cfg.abs_pos_lr_scale})
    # the probe is the last parameter group, so a run can switch it on or off and keep the model's
    # optimizer moments
    n_model = len(opt.param_groups)
    start, elapsed_before = 0, 0.0
    state = None
    if resume:
        if not state_path.exists():
            raise FileNotFoundError(f"--resume: {state_path} does not exist; train without --resume first")
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        saved = state["optimizer"]
        if len(saved["param_groups"]) > n_model:  # saved with a probe: keep only the model's groups
            keep = {i for g in saved["param_groups"][:n_model] for i in g["params"]}
            saved = {
                "state": {k: v for k, v in saved["state"].items() if k in keep},
                "param_groups": saved["param_groups"][:n_model],
            }
        opt.load_state_dict(saved)
    if probe is not None:
        opt.add_param_group({"params": list(probe.parameters()), "weight_decay": 0.0})
        if state is not None and "probe" in state:
            probe.load_state_dict(state["probe"], strict=False)  # a run saved before a head existed
            full = state["optimizer"]
            if len(full["param_groups"]) > n_model:
                ids = full["param_groups"][n_model]["params"]
                for p, i in zip(opt.param_groups[n_model]["params"], ids):
                    if i in full["state"]:
                        opt.state[p] = full["state"][i]
    if state is not None:
        start, elapsed_before = state["step"], state.get("elapsed_s", 0.0)
        log.info("resumed from %s at step %d", state_path, start)
    tok.save(tok_path)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    world = WorldConfig(**{**cfg.world, "size": mc.image_size})
    processor = ImageProcessor.for_config(mc)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "model %s (%s): %.2fM parameters, %d image tokens per frame",
        mc.name,
        cfg.fusion,
        n_params / 1e6,
        mc.image_tokens,
    )

    # validation clips come from the default world (the one `casa eval` scores), whatever the
    # training mix: runs that change --world stay comparable
    val_seeds = [VAL_SEED_BASE + i for i in range(cfg.val_clips)]
    val_world = WorldConfig(size=mc.image_size)
    val_batch = make_batch(
        val_seeds, tok, gen, processor, val_world, [cfg.max_frames] * cfg.val_clips, [None] * cfg.val_clips,
        questions=cfg.questions,
    )  # fmt: skip

    def validate() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            loss, stats = caption_loss(model, val_batch)
        model.train()
        out = {"val_loss": loss.item(), "val_acc": stats["acc"]}
        if "answer_acc" in stats:
            out["val_answer_acc"] = stats["answer_acc"]
        return out

    def save(step: int, elapsed: float) -> None:
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
                "elapsed_s": elapsed,
                **({"probe": probe.state_dict()} if probe is not None else {}),
            },
            out / "train_state.tmp",
        )
        (out / "train_state.tmp").replace(state_path)
        export(model, tok, gen, out)

    logf = (out / "train_log.jsonl").open("a")
    if start == 0:
        first = {"step": 0, **validate()}
        log.info(" ".join(f"{k}={v}" for k, v in first.items()))
        logf.write(json.dumps(first) + "\n")
    model.train()
    t_start = time.monotonic()
    window = {"frames": 0, "tokens": 0, "time": 0.0}
    step = start
    summary: dict = {}
    while step < cfg.steps:
        t0 = time.monotonic()
        lr = lr_at(cfg, step, elapsed_before + t0 - t_start)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        seeds, frames, prompts = step_clips(cfg, step)
        qa_kw = {
            "questions": cfg.questions,
            "qa_weights": cfg.qa_weights,
            "qa_hard_negatives": cfg.qa_hard_negatives,
        }
        batch = make_batch(seeds, tok, gen, processor, world, frames, prompts, **qa_kw)
        loss, stats = caption_loss(model, batch, probe)
        if cfg.questions and cfg.qa_clips:
            qa_seeds, qa_frames, qa_prompts = qa_step_clips(cfg, step)
            qa_batch = make_batch(qa_seeds, tok, gen, processor, world, qa_frames, qa_prompts, **qa_kw)
            qa_loss, qa_stats = caption_loss(model, qa_batch)
            loss = loss + qa_loss
            stats["answer_acc"] = (stats["answer_acc"] + qa_stats["answer_acc"]) / 2
            frames = frames + qa_frames
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # clipped apart: the probe's and the position table's gradients (a fresh head's are
        # large) must not scale down the rest of the model's
        gnorm = torch.nn.utils.clip_grad_norm_(rest, cfg.grad_clip).item()
        for extra in ([pos] if pos is not None else [], list(probe.parameters()) if probe else []):
            if extra:
                torch.nn.utils.clip_grad_norm_(extra, cfg.grad_clip)
        opt.step()
        step += 1
        dt = time.monotonic() - t0
        window["frames"] += sum(frames)
        window["tokens"] += stats["tokens"]
        window["time"] += dt
        elapsed = elapsed_before + time.monotonic() - t_start
        record = {"step": step, "loss": round(stats["caption_loss"], 4), "acc": round(stats["acc"], 4)}
        if "vision_loss" in stats:
            record["vision_loss"] = round(stats["vision_loss"], 4)
        if "answer_acc" in stats:
            record["answer_acc"] = round(stats["answer_acc"], 4)
        if step % cfg.log_every == 0 or step == cfg.steps:
            record |= {
                "lr": round(lr, 6),
                "grad_norm": round(gnorm, 3),
                "frames_per_s": round(window["frames"] / window["time"], 2),
                "caption_tokens_per_s": round(window["tokens"] / window["time"], 1),
                "elapsed_s": round(elapsed, 1),
            }
            window = {"frames": 0, "tokens": 0, "time": 0.0}
            if step % cfg.val_every == 0 or step == cfg.steps:
                record |= validate()
            log.info(" ".join(f"{k}={v}" for k, v in record.items()))
            logf.write(json.dumps(record) + "\n")
            logf.flush()
        summary = record
        out_of_time = cfg.time_budget_s is not None and elapsed >= cfg.time_budget_s
        if step % cfg.save_every == 0 or step == cfg.steps or out_of_time:
            save(step, elapsed)
        if out_of_time:
            log.info("time budget of %.0f s spent at step %d", cfg.time_budget_s, step)
            break
    logf.close()
    if step == start:  # nothing to do (already trained): make sure the export exists
        export(model, tok, gen, out)
    summary = {
        **summary,
        **validate(),
        "step": step,
        "elapsed_s": round(elapsed_before + time.monotonic() - t_start, 1),
    }
    summary["parameters"] = n_params
    return summary
