"""Training: the stream layout matches the engine's, a few steps lower the loss, resume continues."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import ATOL, assert_close
from test_model_streaming import Recorder

from casa_live.model.checkpoint.load import load
from casa_live.model.config import preset
from casa_live.model.engine.engine import Engine, SessionSettings
from casa_live.model.engine.scheduler import answer_ids
from casa_live.model.processor import ImageProcessor
from casa_live.model.tokenizer import Tokenizer
from casa_live.model.training.text import (
    ANSWER_PREFIX,
    QA_TOKENS,
    QUESTION_TEMPLATE,
    STOP,
    generation_config,
    init_new_tokens,
    layout_ids,
    train_tokenizer,
    with_qa_tokens,
)
from casa_live.model.training.train import (
    Batch,
    TrainConfig,
    VisionProbe,
    caption_loss,
    cell_of_tokens,
    dense_logits,
    make_batch,
    train,
    with_abs_pos,
)
from casa_live.model.vlm import CASAModel
from casa_live.model.world import questions
from casa_live.model.world.scene import TRAIN_SEED_BASE, World, WorldConfig, vocabulary


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(512, clips=60)


def test_tokenizer_gives_each_caption_word_one_token(tok):
    for seed in range(20):
        world = World(TRAIN_SEED_BASE + seed)
        for _ in range(12):
            caption = world.step().caption
            assert len(tok.encode(caption)) == len(caption.split()), caption
            assert tok.decode(tok.encode(caption)) == caption
    for special in ("<|vision_start|>", "<|vision_end|>", STOP, "<|pad|>"):
        assert tok.encode(special) == [tok.token_id(special)]
    assert tok.vocab_size <= 512
    assert set(vocabulary()) >= {"red", "circle", "appears"}
    assert tok.encode("any prompt at all, even émojis 🙂")  # byte-level: nothing is unknown


def test_every_word_of_the_question_language_is_one_token(tok, tmp_path):
    """with_qa_tokens: the delimiters and each question word one token (a question is as many tokens
    as words, plus its "?" and delimiters), captions and the earlier ids unchanged, and the result
    survives a save and a load (the ids `tokenizers` gives added tokens on load included)."""
    before = copy.deepcopy(tok)
    qtok = with_qa_tokens(copy.deepcopy(tok))
    assert qtok.vocab_size > tok.vocab_size
    for text in questions.every_text():
        ids = qtok.encode(QUESTION_TEMPLATE.format(question=text))
        assert len(ids) == len(text.split()) + 3, (text, [qtok.tok.id_to_token(i) for i in ids])
        assert qtok.decode(ids) == text
    for seed in range(20):
        world = World(TRAIN_SEED_BASE + seed)
        for _ in range(12):
            caption = world.step().caption
            assert qtok.encode(caption) == before.encode(caption)
    for word, i in before.tok.get_vocab().items():
        assert qtok.token_id(word) == i
    qtok.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert with_qa_tokens(loaded) is loaded  # nothing left to add
    q = QUESTION_TEMPLATE.format(question="what colour is the object at the top left?")
    assert loaded.encode(q) == qtok.encode(q)
    assert [loaded.token_id(t) for t in QA_TOKENS] == [qtok.token_id(t) for t in QA_TOKENS]


def test_an_answer_is_written_in_its_captions_tokens(tok):
    """Answers begin with ANSWER_PREFIX, so that each answer word is one token, the caption's own
    where the caption has it ("Ġbottom"), never bare pieces ("b ot tom", whose "b" also begins
    "blue" and "big"); the answer's decoder takes the prefix off its text and deltas; a watch's
    yes/no ids are the prefixed whole words."""
    qtok = with_qa_tokens(copy.deepcopy(tok))
    gen = generation_config(qa=True)
    assert gen.template.answer_prefix == ANSWER_PREFIX == " "
    for word in questions.every_answer_word():
        assert len(qtok.encode(ANSWER_PREFIX + word)) == 1, word
    caption = World(TRAIN_SEED_BASE).step().caption  # a caption's words are the same ids
    for word in caption.split()[1:]:
        if word in questions.every_answer_word():
            assert qtok.encode(ANSWER_PREFIX + word) == [qtok.encode(caption)[caption.split().index(word)]]
    ids = qtok.encode(ANSWER_PREFIX + "bottom right")
    assert [qtok.tok.id_to_token(i) for i in ids] == ["Ġbottom", "Ġright"]
    assert len(tok.encode("bottom right")) > 2  # bare, the first word is pieces
    dec = qtok.stream(gen.template.answer_prefix)
    assert [dec.push(i) for i in ids] == ["bottom", " right"]
    assert dec.text == "bottom right"
    assert qtok.stream().push(ids[0]) == " bottom"  # a caption's decoder keeps its text as is
    yes_no = answer_ids(qtok, gen.template.answer_prefix)
    assert qtok.token_id("Ġyes") in yes_no["yes"] and qtok.token_id("Ġno") in yes_no["no"]
    assert not set(yes_no["yes"]) & set(yes_no["no"])


def test_new_tokens_start_at_their_pieces_mean_embedding(tok):
    qtok = with_qa_tokens(copy.deepcopy(tok))
    cfg = preset("test-tiny")
    cfg.lm.vocab = 512
    model = CASAModel.random(cfg, seed=1)
    before = model.lm.embed_tokens.weight.detach().clone()
    init_new_tokens(model, tok, qtok)
    after = model.lm.embed_tokens.weight.detach()
    assert torch.equal(after[: tok.vocab_size], before[: tok.vocab_size])  # old tokens untouched
    none = qtok.token_id("Ġnone")
    pieces = tok.encode(" none")
    assert len(pieces) > 1 and none >= tok.vocab_size
    assert torch.allclose(after[none], before[pieces].mean(0))
    assert torch.equal(after[qtok.vocab_size :], before[qtok.vocab_size :])  # unused rows too


def test_stream_layout_is_what_the_engine_feeds(tok):
    """Record the tokens a (random) model's engine feeds, frame by frame, and rebuild them."""
    gen = generation_config()
    cfg = preset("test-tiny")
    cfg.lm.vocab = 512
    engine = Engine(CASAModel.random(cfg), tok, gen, max_sessions=1)
    fed: list[int] = []
    frame_at: list[int] = []

    def observe(res):  # type: ignore[no-untyped-def]
        if 0 in res.frames:  # a frame starts before the tokens of its tick are fed
            frame_at.append(len(fed))
        fed.extend(int(t) for t in res.fed.get(0, []) if not isinstance(t, torch.Tensor))

    engine.observers.append(observe)
    row = engine.open("What is happening?")
    generated = []
    for _ in range(3):
        events = list(engine.caption(row, np.zeros((24, 24, 3), np.uint8)))
        generated.append([ev.token for ev in events if ev.token is not None])
    while engine.has_work():  # the last frame's stop token and the next pre_image go in now
        engine.step()
    seq = layout_ids(tok, gen, generated, "What is happening?")
    assert fed == seq.tokens + tok.encode(gen.template.pre_image)
    assert frame_at == seq.insert_at


def test_a_question_branch_is_what_training_lays_out(tok):
    """The layout of a clip ending with a question (in place of its last frame's caption: the
    question opens the frame's CASA window) is what the engine feeds on a branch, and training's
    dense logits of it are the branch's logits: a model fine-tuned on questions is served as it
    was trained."""
    qtok = with_qa_tokens(copy.deepcopy(tok))
    gen = generation_config(qa=True)
    cfg = preset("test-tiny")
    cfg.lm.vocab = 512
    model = CASAModel.random(cfg, seed=3)
    engine = Engine(model, qtok, gen, max_sessions=1, max_context_tokens=256)
    rec = Recorder(engine)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(2)]
    row = engine.open("What is happening?", SessionSettings(max_new_tokens=4))
    generated = []
    for image in images:
        events = list(engine.caption(row, image))
        generated.append([ev.token for ev in events if ev.token is not None])
    while engine.has_work():
        engine.step()
    question = "what is at the top left?"
    branch, frame = engine.ask(row, question, max_new_tokens=3)
    while engine.has_work():
        engine.step()
    prefix = rec.join_branch(row, branch, frame)
    fed = qtok.encode(gen.template.question.format(question=question))
    answer = rec.tokens[branch][len(prefix) + len(fed) :]
    seq = layout_ids(qtok, gen, generated[:-1], "What is happening?", (fed, answer))
    assert seq.tokens[: len(rec.tokens[branch])] == rec.tokens[branch]
    assert seq.insert_at == [at for at, _ in rec.frames[branch]]
    assert seq.insert_at[-1] == len(prefix)  # the last frame, right after the previous caption's close
    T = len(seq.tokens)
    processor = ImageProcessor.for_config(cfg)
    batch = Batch(
        tokens=torch.tensor([seq.tokens]),
        target=torch.tensor([seq.target]),
        text_len=torch.tensor([T]),
        insert_at=torch.tensor([seq.insert_at]),
        n_frames=torch.tensor([2]),
        patches=torch.stack([processor(im) for im in images]),
        token_labels=torch.zeros(2, cfg.image_tokens, 3, dtype=torch.long),
        answer=torch.tensor([seq.answer]),
    )
    with torch.no_grad():
        dense = dense_logits(model, batch)[0][0]
    ours = torch.stack(rec.logits[branch])  # (fed and answer tokens of the branch, V)
    assert_close(
        ours, dense[len(prefix) : len(prefix) + len(ours)], torch.float32, "branch vs training", atol=ATOL
    )


def test_batch_targets_cover_captions_and_stops(tok):
    gen = generation_config()
    cfg = preset("test-tiny")
    batch = make_batch(
        [TRAIN_SEED_BASE + 3, TRAIN_SEED_BASE + 4],
        tok,
        gen,
        ImageProcessor.for_config(cfg),
        WorldConfig(size=cfg.image_size),
        [3, 5],
        [None, "What is happening?"],
    )
    assert batch.patches.shape[0] == 8
    assert batch.insert_at.shape == (2, 5)
    stop = tok.token_id(STOP)
    for b in range(2):
        ids = batch.tokens[b, : batch.text_len[b]]
        assert int((ids == stop).sum()) == int(batch.n_frames[b])
        assert bool(batch.target[b, : batch.text_len[b]][ids == stop].all())
        assert not bool(batch.target[b, batch.text_len[b] :].any())


def _tiny(steps: int, **kw) -> TrainConfig:
    base = dict(
        preset="test-tiny",
        vocab=512,
        steps=steps,
        batch=4,
        min_frames=2,
        max_frames=4,
        lr=3e-3,
        warmup=2,
        log_every=2,
        val_every=2,
        save_every=2,
        val_clips=4,
    )
    return TrainConfig(**{**base, **kw})


@pytest.mark.slow  # ~40 s of training steps on the 2-core box
def test_a_few_steps_lower_the_loss_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    summary = train(_tiny(8), out)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and "val_loss" in log[0]
    assert summary["val_loss"] < log[0]["val_loss"] - 0.5, (log[0], summary)
    assert all("frames_per_s" in r for r in log[1:])
    # resume: continues from step 8 to 10, same run directory
    summary2 = train(_tiny(10), out, resume=True)
    assert summary2["step"] == 10
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 4, 6, 8, 10]
    # the exported checkpoint loads strictly and streams
    model, tok, gen = load(out)
    assert model.config.lm.vocab == 512
    engine = Engine(model, tok, gen, max_sessions=1)
    row = engine.open()
    events = list(engine.caption(row, np.zeros((40, 40, 3), np.uint8)))
    assert events[-1].done


@pytest.mark.parametrize("fusion", ["ca", "insertion"])
def test_other_fusions_train(fusion):
    tok = train_tokenizer(512, clips=20)
    cfg = preset("test-tiny")
    cfg.lm.vocab = 512
    cfg.casa.fusion = fusion
    model = CASAModel.random(cfg)
    batch = make_batch(
        [TRAIN_SEED_BASE + i for i in range(2)],
        tok,
        generation_config(),
        ImageProcessor.for_config(cfg),
        WorldConfig(size=cfg.image_size),
        [2, 3],
        [None, None],
    )
    loss, stats = caption_loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and stats["tokens"] > 0


def test_world_overrides_change_the_training_mix_only_where_asked():
    from collections import Counter

    from casa_live.cli.train import world_overrides
    from casa_live.model.world.scene import World, WorldConfig

    over = world_overrides(["change_prob=0.9", "leave_weight=0.9"])
    assert over == {"change_prob": 0.9, "leave_weight": 0.9}
    with pytest.raises(SystemExit, match="KEY one of"):
        world_overrides(["size=64"])  # the model decides the frame size
    with pytest.raises(SystemExit, match="not a float"):
        world_overrides(["change_prob=lots"])

    def kinds(cfg: WorldConfig) -> Counter:
        c: Counter = Counter()
        for seed in range(100):
            w = World(seed, cfg)
            for _ in range(16):
                c.update(e.kind for e in w.step().events)
        return c

    base, rich = kinds(WorldConfig()), kinds(WorldConfig(**over))
    assert rich["leaves"] > 1.5 * base["leaves"]


def test_slot_accuracy_scores_each_caption_word(tok):
    """An oracle that predicts every next token scores 1.0 everywhere; one that gets word 1 of
    every "moves" caption wrong scores 0 exactly there and nowhere else."""
    import torch.nn.functional as F

    from casa_live.model.checkpoint.toy import toy_model
    from casa_live.model.training.evaluate import slot_accuracy
    from casa_live.model.training.text import generation_config
    from casa_live.model.world.scene import WorldConfig, generate_clip

    model = toy_model("test-tiny", seed=0)
    model.config.lm.vocab = max(model.config.lm.vocab, tok.vocab_size)
    gen = generation_config()
    seeds = [5, 6, 7]
    moves_colour: set[int] = set()  # token positions of word 1 of every "moves" caption

    def oracle(batch):  # logits (B, T, V) whose argmax at t is token t + 1
        logits = F.one_hot(batch.tokens.roll(-1, dims=1), tok.vocab_size).float()
        for t in moves_colour:  # set for one-clip calls only
            logits[0, t - 1] = logits[0, t - 1].roll(1)
        return logits

    model.forward_dense = oracle
    perfect = slot_accuracy(model, tok, gen, seeds, frames=12)
    assert sum(perfect.captions.values()) == 3 * 12
    assert all(perfect.correct[k] == n for k, n in perfect.total.items())

    from casa_live.model.training.text import stream_layout

    # mark word 1 of "moves" captions, clip by clip (slot_accuracy runs clips in seed order)
    results = []
    for seed in seeds:
        clip = generate_clip(seed, WorldConfig(frames=12, size=model.config.image_size))
        seq = stream_layout(tok, gen, clip.captions, None)
        moves_colour.clear()
        frame, word = -1, 0
        for t in range(1, len(seq.tokens)):
            if not seq.target[t]:
                continue
            if not seq.target[t - 1]:
                frame, word = frame + 1, 0
            ev = clip.truth[frame].events
            if frame > 0 and ev and ev[0].kind == "moves" and word == 1:
                moves_colour.add(t)
            word += 1
        results.append(slot_accuracy(model, tok, gen, [seed], frames=12))
    wrong = {k for r in results for k, n in r.total.items() if r.correct[k] != n}
    assert wrong == {("moves", 1)}


def test_a_position_table_starts_as_the_model_it_extends():
    """with_abs_pos adds a zero table: the same image tokens, logits and captions as before; a table
    of another side is resized to the frame's grid, corners kept."""
    cfg = preset("test-tiny")
    model = CASAModel.random(cfg, seed=3).eval()
    grown = with_abs_pos(model, 3).eval()
    assert grown.config.vision.abs_pos == 3 and model.config.vision.abs_pos == 0
    assert torch.count_nonzero(grown.vision.pos_embed) == 0
    merge = cfg.vision.merge
    grid = (4 * merge, 6 * merge)  # a 4 x 6 merged grid: the 3 x 3 table is resized
    patches = torch.randn(2, grid[0] * grid[1], cfg.vision.patch_dim)
    with torch.no_grad():
        assert_close(grown.vision(patches, grid), model.vision(patches, grid), torch.float32, atol=ATOL)
        grown.vision.pos_embed.normal_()
        table = grown.vision.pos_embed
        pos = grown.vision.positions(grid).view(4, 6, -1)
        for r, c, tr, tc in [(0, 0, 0, 0), (0, 5, 0, 2), (3, 0, 2, 0), (3, 5, 2, 2)]:
            assert_close(pos[r, c], table[tr, tc], torch.float32, atol=ATOL)
        moved = grown.vision(patches, grid) - model.vision(patches, grid)
        assert_close(moved, pos.reshape(1, 24, -1).expand(2, -1, -1).contiguous(), torch.float32, atol=ATOL)


@pytest.mark.slow  # a few training steps
def test_a_position_table_trains_and_resumes(tmp_path):
    out = tmp_path / "run"
    train(_tiny(2, abs_pos=3, save_every=1), out)
    state = torch.load(out / "train_state.pt", weights_only=False)
    # its own optimizer group, at lr_scale times the LR, without weight decay
    group = state["optimizer"]["param_groups"][2]
    assert group["lr_scale"] == 10.0 and group["weight_decay"] == 0.0
    summary = train(_tiny(3, abs_pos=3), out, resume=True)
    assert summary["step"] == 3
    model, _, _ = load(out)
    assert model.config.vision.abs_pos == 3
    assert torch.count_nonzero(model.vision.pos_embed) > 0  # it learned from zero


def test_the_position_probe_trains_the_table_alone():
    """VisionProbe's position loss asks each image token its scene-grid row and column; with the
    table given, its gradient reaches the position table (and the probe's head), never the tower."""
    assert cell_of_tokens(8).view(8, 8, 2)[:, :, 0].tolist() == [[r] * 8 for r in (0, 0, 0, 1, 1, 2, 2, 2)]
    assert cell_of_tokens(8).view(8, 8, 2)[:, :, 1].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]] * 8
    assert cell_of_tokens(3).tolist() == [[r, c] for r in range(3) for c in range(3)]
    cfg = preset("test-tiny")
    model = with_abs_pos(CASAModel.random(cfg, seed=3), 4)
    merge = cfg.vision.merge
    grid = (4 * merge, 4 * merge)
    patches = torch.randn(2, grid[0] * grid[1], cfg.vision.patch_dim)
    images = model.vision(patches, grid)
    labels = torch.zeros(2, 16, 3, dtype=torch.long)
    probe = VisionProbe(images.shape[-1], weight=0.0, position=1.0)
    probe.loss(images, labels, model.vision.positions(grid)).backward()
    assert model.vision.pos_embed.grad is not None and model.vision.pos_embed.grad.abs().sum() > 0
    assert probe.where.weight.grad is not None and probe.head.weight.grad is None  # no colour loss
    tower = [p for n, p in model.vision.named_parameters() if n != "pos_embed"]
    assert all(p.grad is None or not p.grad.any() for p in tower)
    model.zero_grad()
    probe.loss(model.vision(patches, grid), labels).backward()  # without the table: the tower learns
    assert any(p.grad is not None and p.grad.any() for p in tower)
