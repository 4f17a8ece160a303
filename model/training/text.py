"""The text side of the bundled model: its tokenizer, the question language's tokens, its
generation config, and the token layout of a training clip, which is exactly what the engine feeds
and generates (docs/training.md). model/training/train.py trains on these layouts."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from casa_live.model.config import GenerationConfig, PromptTemplate
from casa_live.model.tokenizer import Tokenizer
from casa_live.model.vlm import CASAModel
from casa_live.model.world import questions as qa_lang
from casa_live.model.world.scene import TRAIN_SEED_BASE, World

SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|frame_end|>"]
# A question on a side branch (model/world/questions.py's language): after a frame's caption is
# closed, <|question|> the question <|answer|> the answer, then the stop token.
QA_TOKENS = ["<|question|>", "<|answer|>"]
QUESTION_TEMPLATE = "<|question|>{question}<|answer|>"
# An answer begins with a space, so that its words are its captions' tokens ("Ġbottom"), which the
# model already writes; bare, "bottom" is "b ot tom" (PromptTemplate.answer_prefix).
ANSWER_PREFIX = " "
STOP = "<|frame_end|>"
DEFAULT_PROMPT = "Describe what you see."
# Prompts seen in training (one per clip), so a user's own wording does not surprise the model.
PROMPTS = [
    DEFAULT_PROMPT,
    "Describe what you see.",
    "What is happening?",
    "Commentate the scene live.",
    "Describe the video in real time.",
    "Tell me what changes.",
    "",
]


# ---------------------------------------------------------------- tokenizer and generation config


def train_tokenizer(vocab_size: int = 512, clips: int = 400) -> Tokenizer:
    """Byte-level BPE trained on the world's captions: every caption word becomes one token, and any
    other text (a user's prompt) still encodes, byte by byte at worst."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines: list[str] = []
    for seed in range(clips):  # captions depend only on the scene dynamics: no rendering needed
        world = World(TRAIN_SEED_BASE + seed)
        lines += [world.step().caption for _ in range(16)]
    lines += PROMPTS * 20
    tok.train_from_iterator(lines, trainer)
    return Tokenizer(tok)


def with_qa_tokens(tok: Tokenizer) -> Tokenizer:
    """The tokenizer with the question delimiters and the question language's words (appended
    after its vocabulary, so every other token keeps its id and a trained model can learn them by
    fine-tuning)."""
    missing = [t for t in QA_TOKENS if t not in tok.tok.get_vocab(with_added_tokens=True)]
    if missing:
        tok.tok.add_special_tokens(missing)
    return with_question_words(tok)


def with_question_words(tok: Tokenizer) -> Tokenizer:
    """Make every word of the question language (its questions, and its answers after
    ANSWER_PREFIX) one token, as every caption word is: BPE merges
    appended after the trained ones join each word's current pieces left to right ("Ġ o b j e c t"
    -> "Ġobject"), the intermediate pieces becoming tokens too. Without them a question is 2-3
    times longer ("is there a blue object?" was 14 tokens, and 4 such watches 33 packed tokens a
    frame), which every watch pays on every frame. Appended merges rank after the trained ones, so
    a caption still encodes as before; text outside both languages (a user's prompt) may encode in
    fewer pieces. Idempotent."""
    hf = tok.tok
    data = json.loads(hf.to_str())
    if data["model"]["type"] != "BPE":  # a word-level tokenizer (tests) has whole words already
        return tok
    # (the raw word, e.g. " object", and its byte-level form, "Ġobject")
    texts = [*qa_lang.every_text(), ANSWER_PREFIX + " ".join(qa_lang.every_answer_word())]
    words = {(q[a:b], w) for q in texts for w, (a, b) in hf.pre_tokenizer.pre_tokenize_str(q)}
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    # `tokenizers` numbers an added token absent from the model's vocabulary after that vocabulary
    # when it loads one: pin the added ones (the question delimiters) there at their ids first
    for a in data["added_tokens"]:
        vocab.setdefault(a["content"], a["id"])
    next_id = max(vocab.values()) + 1
    known = {tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges}
    changed = False
    for raw, word in sorted(words):
        pieces = [hf.id_to_token(i) for i in hf.encode(raw, add_special_tokens=False).ids]
        if len(pieces) < 2 or "".join(pieces) != word:
            continue
        cur = pieces[0]
        for p in pieces[1:]:
            if (cur, p) not in known:
                merges.append([cur, p] if not merges or isinstance(merges[0], list) else f"{cur} {p}")
                known.add((cur, p))
            cur += p
            if cur not in vocab:
                vocab[cur] = next_id
                next_id += 1
            changed = True
    if not changed:
        return tok
    return Tokenizer(HFTokenizer.from_str(json.dumps(data)))


def init_new_tokens(model: CASAModel, old: Tokenizer, new: Tokenizer) -> None:
    """Start each token `new` adds to `old` (ids from old.vocab_size on) at the mean embedding of
    the pieces `old` split its text into: the embedding is tied to the output, so the new token
    starts about as likely as the pieces it replaces, where an unused row starts far below
    them. Rows past the model's vocabulary are left to the caller's check."""
    emb = model.lm.embed_tokens.weight  # (vocab, hidden)
    with torch.no_grad():
        for i in range(old.vocab_size, min(new.vocab_size, emb.shape[0])):
            text = new.tok.decode([i], skip_special_tokens=False)
            pieces = old.encode(text)
            if pieces:
                emb[i] = emb[pieces].mean(0)


def generation_config(qa: bool = False) -> GenerationConfig:
    return GenerationConfig(
        stop_tokens=[STOP],
        template=PromptTemplate(
            prefix="{prompt}",
            pre_image="<|vision_start|>",
            post_image="<|vision_end|>",
            caption_prefix="",
            default_prompt=DEFAULT_PROMPT,
            question=QUESTION_TEMPLATE if qa else None,
            answer_prefix=ANSWER_PREFIX if qa else "",
        ),
        # the longest caption of the world, three objects listed (a restatement of the scene, at
        # frame 0 or after a gap in the stream: server/overload.py), is 26 tokens and its stop
        max_new_tokens=32,
        restate_after_gap=True,
        temperature=0.0,
        # The longest training clip (TrainConfig.max_frames = 16 frames) is ~150 text tokens; 256
        # keeps every row above that after an eviction (192..256) and measured no worse than 1024
        # on 60 s streams (docs/engine.md), at a quarter of the attention reads.
        context_tokens=256,
    )


# ---------------------------------------------------------------- sequences


@dataclass
class Sequence:
    tokens: list[int]
    target: list[bool]  # target[i]: token i is a caption (or stop) token the loss predicts
    insert_at: list[int]  # frame f is inserted before text token insert_at[f]
    answer: list[bool] = field(default_factory=list)  # answer[i]: token i is an answer (or its stop)


def stream_layout(
    tok: Tokenizer,
    gen: GenerationConfig,
    captions: list[str],
    prompt: str | None,
    qa: tuple[str, str] | None = None,
) -> Sequence:
    """The text stream the Engine feeds and generates for these captions (see module docstring);
    with `qa` (question, answer), a question about the last frame takes the place of its caption
    (layout_ids): `captions[-1]` is left out."""
    if qa is None:
        return layout_ids(tok, gen, [tok.encode(c) for c in captions], prompt)
    return layout_ids(tok, gen, [tok.encode(c) for c in captions[:-1]], prompt, qa_ids(tok, gen, *qa))


def qa_ids(tok: Tokenizer, gen: GenerationConfig, question: str, answer: str) -> tuple[list[int], list[int]]:
    """The token ids a question branch feeds (the template around the question) and generates."""
    assert gen.template.question is not None, "this generation config has no question template"
    t = gen.template
    return tok.encode(t.question.format(question=question)), tok.encode(t.answer_prefix + answer)


def layout_ids(
    tok: Tokenizer,
    gen: GenerationConfig,
    captions: list[list[int]],
    prompt: str | None,
    qa: tuple[list[int], list[int]] | None = None,
) -> Sequence:
    """stream_layout over caption token ids (what a model generated, or encoded ground truth).
    A question branch (qa: fed ids, answer ids) starts where the engine forks a row: at the start
    of the last frame, right after its image is inserted and before anything of its caption
    (docs/engine.md, "Questions"). So the branch takes the place of the last frame's caption:
    `captions` has one entry fewer than the clip has frames, and the question's tokens open the
    last frame's CASA window as a caption's would."""
    t = gen.template
    stop = tok.token_id(gen.stop_tokens[0])
    pre, post, cap_prefix = tok.encode(t.pre_image), tok.encode(t.post_image), tok.encode(t.caption_prefix)
    tokens = tok.encode(t.prefix.format(prompt=t.default_prompt if prompt is None else prompt)) + pre
    target = [False] * len(tokens)
    insert_at: list[int] = []
    for f, caption in enumerate(captions):
        if f > 0:
            tokens += pre
            target += [False] * len(pre)
        insert_at.append(len(tokens))
        head = post + (cap_prefix if f == 0 else [])
        body = [*caption, stop]
        tokens += head + body
        target += [False] * len(head) + [True] * len(body)
    answer = [False] * len(tokens)
    if qa is not None:
        if captions:
            tokens += pre
            target += [False] * len(pre)
            answer += [False] * len(pre)
        insert_at.append(len(tokens))
        fed, ans = qa[0], [*qa[1], stop]
        tokens += fed + ans
        target += [False] * len(fed) + [True] * len(ans)
        answer += [False] * len(fed) + [True] * len(ans)
    return Sequence(tokens, target, insert_at, answer)
