"""The question language of the synthetic world: fixed questions and their ground-truth answers.

Clients, tests, training and evaluation share these forms exactly (lower case; positions are
`{row} {col}` as in the captions; "none" answers a question about anything absent):

| kind        | question                                          | answer                          |
|-------------|---------------------------------------------------|---------------------------------|
| count       | how many objects are there?                       | zero / one / two / three        |
| empty       | is the scene empty?                               | yes / no                        |
| exists      | is there a {colour} {shape}?                      | yes / no                        |
| colour_any  | is there a {colour} object?                       | yes / no                        |
| shape_any   | is there a {shape}?                               | yes / no                        |
| where       | where is the {colour} {shape}?                    | {row} {col} / none              |
| size        | how big is the {colour} {shape}?                  | big / small / none              |
| colour_at   | what colour is the object at the {row} {col}?     | {colour} / none                 |
| what_at     | what is at the {row} {col}?                       | a {size} {colour} {shape} / none|

Every answer is a function of one frame's objects (FrameTruth.objects), so it is inferable from
the frame the answer is bound to. `YES_NO` kinds are the ones a watch can use (a probability of
"yes" against "no").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from casa_live.model.world.scene import COLOURS, COLS, ROWS, SHAPES, SIZES, ObjectState

NUMBERS = ("zero", "one", "two", "three")
KINDS = ("count", "empty", "exists", "colour_any", "shape_any", "where", "size", "colour_at", "what_at")
YES_NO = ("empty", "exists", "colour_any", "shape_any")
NONE = "none"


@dataclass(frozen=True)
class Question:
    kind: str
    text: str
    answer: str


def count(objects: tuple[ObjectState, ...]) -> Question:
    return Question("count", "how many objects are there?", NUMBERS[len(objects)])


def empty(objects: tuple[ObjectState, ...]) -> Question:
    return Question("empty", "is the scene empty?", _yes(not objects))


def exists(objects: tuple[ObjectState, ...], colour: str, shape: str) -> Question:
    hit = any(o.colour == colour and o.shape == shape for o in objects)
    return Question("exists", f"is there a {colour} {shape}?", _yes(hit))


def colour_any(objects: tuple[ObjectState, ...], colour: str) -> Question:
    return Question(
        "colour_any", f"is there a {colour} object?", _yes(any(o.colour == colour for o in objects))
    )


def shape_any(objects: tuple[ObjectState, ...], shape: str) -> Question:
    return Question("shape_any", f"is there a {shape}?", _yes(any(o.shape == shape for o in objects)))


def where(objects: tuple[ObjectState, ...], colour: str, shape: str) -> Question:
    o = _find(objects, colour, shape)
    return Question("where", f"where is the {colour} {shape}?", o.position if o else NONE)


def size(objects: tuple[ObjectState, ...], colour: str, shape: str) -> Question:
    o = _find(objects, colour, shape)
    return Question("size", f"how big is the {colour} {shape}?", o.size if o else NONE)


def colour_at(objects: tuple[ObjectState, ...], row: str, col: str) -> Question:
    o = _at(objects, row, col)
    return Question("colour_at", f"what colour is the object at the {row} {col}?", o.colour if o else NONE)


def what_at(objects: tuple[ObjectState, ...], row: str, col: str) -> Question:
    o = _at(objects, row, col)
    answer = f"a {o.size} {o.colour} {o.shape}" if o else NONE
    return Question("what_at", f"what is at the {row} {col}?", answer)


def sample(
    objects: tuple[ObjectState, ...],
    rng: np.random.Generator,
    kind: str | None = None,
    weights: dict[str, float] | None = None,
    hard_negatives: float = 0.0,
) -> Question:
    """One question about this frame, of `kind` (when None, a kind drawn uniformly, or in
    proportion to `weights`, kind -> weight, missing kinds weighing 1). Subjects are drawn half the
    time from the objects present and half the time at random, so "yes" and "no", and answers and
    "none", both come up often. `hard_negatives`: the share of the random subjects that are near
    misses instead, a present object's colour with another shape or its shape with another colour
    ("is there a red square?" beside a red circle): the pairs a model that does not bind colour to
    shape gets wrong. 0 draws exactly what earlier versions drew."""
    if kind is None:
        if weights:
            w = np.array([float(weights.get(k, 1.0)) for k in KINDS])
            kind = KINDS[int(rng.choice(len(KINDS), p=w / w.sum()))]
        else:
            kind = KINDS[int(rng.integers(len(KINDS)))]
    present = bool(objects) and rng.random() < 0.5
    pick = objects[int(rng.integers(len(objects)))] if present else None
    colour = pick.colour if pick else list(COLOURS)[int(rng.integers(len(COLOURS)))]
    shape = pick.shape if pick else SHAPES[int(rng.integers(len(SHAPES)))]
    row = ROWS[pick.row] if pick else ROWS[int(rng.integers(len(ROWS)))]
    col = COLS[pick.col] if pick else COLS[int(rng.integers(len(COLS)))]
    if hard_negatives > 0 and objects and not present and rng.random() < hard_negatives:
        o = objects[int(rng.integers(len(objects)))]
        if rng.random() < 0.5:
            others = [x for x in SHAPES if x != o.shape]
            colour, shape = o.colour, others[int(rng.integers(len(others)))]
        else:
            others = [x for x in COLOURS if x != o.colour]
            colour, shape = others[int(rng.integers(len(others)))], o.shape
    if kind == "count":
        return count(objects)
    if kind == "empty":
        return empty(objects)
    if kind == "exists":
        return exists(objects, colour, shape)
    if kind == "colour_any":
        return colour_any(objects, colour)
    if kind == "shape_any":
        return shape_any(objects, shape)
    if kind == "where":
        return where(objects, colour, shape)
    if kind == "size":
        return size(objects, colour, shape)
    if kind == "colour_at":
        return colour_at(objects, row, col)
    if kind == "what_at":
        return what_at(objects, row, col)
    raise ValueError(f"unknown question kind {kind!r}; one of {KINDS}")


def every_text() -> list[str]:
    """Every question of the language, each subject filled in (the tokenizer makes their words
    tokens of their own: model/training/text.py `with_question_words`)."""
    out = []
    for colour in COLOURS:
        for shape in SHAPES:
            out += [
                exists((), colour, shape).text,
                where((), colour, shape).text,
                size((), colour, shape).text,
            ]
        out.append(colour_any((), colour).text)
    out += [shape_any((), shape).text for shape in SHAPES]
    for row in ROWS:
        for col in COLS:
            out += [colour_at((), row, col).text, what_at((), row, col).text]
    return [*out, count(()).text, empty(()).text]


def every_answer_word() -> list[str]:
    """Every word an answer can hold (a position, a colour, a shape, a size, a number, yes, no,
    none, "a"): the bundled tokenizer makes each, after a space, one token, as a caption's words
    are (model/training/text.py `with_question_words`)."""
    return sorted({*NUMBERS, "yes", "no", NONE, "a", *ROWS, *COLS, *COLOURS, *SHAPES, *SIZES})


_COLOUR = "|".join(COLOURS)
_SHAPE = "|".join(SHAPES)
_ROW, _COL = "|".join(ROWS), "|".join(COLS)
_FORMS = [
    ("count", re.compile(r"how many objects are there\?")),
    ("empty", re.compile(r"is the scene empty\?")),
    ("exists", re.compile(rf"is there a (?P<colour>{_COLOUR}) (?P<shape>{_SHAPE})\?")),
    ("colour_any", re.compile(rf"is there a (?P<colour>{_COLOUR}) object\?")),
    ("shape_any", re.compile(rf"is there a (?P<shape>{_SHAPE})\?")),
    ("where", re.compile(rf"where is the (?P<colour>{_COLOUR}) (?P<shape>{_SHAPE})\?")),
    ("size", re.compile(rf"how big is the (?P<colour>{_COLOUR}) (?P<shape>{_SHAPE})\?")),
    ("colour_at", re.compile(rf"what colour is the object at the (?P<row>{_ROW}) (?P<col>{_COL})\?")),
    ("what_at", re.compile(rf"what is at the (?P<row>{_ROW}) (?P<col>{_COL})\?")),
]


def parse(text: str) -> tuple[str, dict[str, str]] | None:
    """The kind and subject of a question in the language, or None for any other text."""
    for kind, pattern in _FORMS:
        m = pattern.fullmatch(text.strip())
        if m:
            return kind, m.groupdict()
    return None


def answer(text: str, objects: tuple[ObjectState, ...]) -> Question | None:
    """The ground truth of a question in the language about these objects (None: not in it)."""
    parsed = parse(text)
    if parsed is None:
        return None
    kind, g = parsed
    builders = {
        "count": lambda: count(objects),
        "empty": lambda: empty(objects),
        "exists": lambda: exists(objects, g.get("colour", ""), g.get("shape", "")),
        "colour_any": lambda: colour_any(objects, g.get("colour", "")),
        "shape_any": lambda: shape_any(objects, g.get("shape", "")),
        "where": lambda: where(objects, g.get("colour", ""), g.get("shape", "")),
        "size": lambda: size(objects, g.get("colour", ""), g.get("shape", "")),
        "colour_at": lambda: colour_at(objects, g.get("row", ""), g.get("col", "")),
        "what_at": lambda: what_at(objects, g.get("row", ""), g.get("col", "")),
    }
    return builders[kind]()


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def _find(objects: tuple[ObjectState, ...], colour: str, shape: str) -> ObjectState | None:
    return next((o for o in objects if o.colour == colour and o.shape == shape), None)


def _at(objects: tuple[ObjectState, ...], row: str, col: str) -> ObjectState | None:
    return next((o for o in objects if ROWS[o.row] == row and COLS[o.col] == col), None)
