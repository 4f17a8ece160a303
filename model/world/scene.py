"""A synthetic streaming-caption world: seeded video clips with a live commentator's ground truth.

The bundled default model is trained and evaluated on this world, and clients, the server's demo and
the benchmarks use it as a camera that needs no files. Design choices:

- A scene is a 3 x 3 grid of nameable cells (rows top/middle/bottom x columns left/centre/right).
  Each object sits in one cell (with a small fixed jitter), so every position has a name and objects
  never overlap. 0-3 objects at a time, each with a colour (6), a shape (4) and a size (2). Colours
  are unique within a scene, so "the red circle" always names one object.
- At most ONE change per frame: an object appears, moves one cell (up/down/left/right) or leaves.
  Captions are short and regular (a vocabulary of ~40 words) because the model is tiny:
      frame 0:  "a big red circle at the top left and a small blue cross at the bottom right"
                "the scene is empty"
      appears:  "a small green triangle appears at the middle centre"
      moves:    "the green triangle moves up to the top centre"
      leaves:   "the green triangle leaves"
      nothing:  "nothing changes"
- Every caption is inferable from the current frame plus the text history alone (what CASA's text
  stream carries between frames): each caption that mentions an object states its new position, so
  the last caption naming an object says where it was. Moves name the destination cell so a model
  never has to add up displacements.
- Renderer works at any size (positions and radii are stored as fractions of the frame). Objects are
  anti-aliased signed-distance shapes; backgrounds are plain, gradient or smooth noise in dark tones so
  that the saturated object colours stand out; each frame adds mild camera noise (Gaussian pixel
  noise plus a small global brightness flicker).
- Everything is a pure function of (seed, WorldConfig): the same seed gives the same pixels and
  captions on every machine.

Use:  clip = generate_clip(seed, WorldConfig(frames=16));  clip.frames (F, H, W, 3) uint8,
clip.captions, clip.truth[i].objects / .events.  `World(seed)` is the endless version (step()/render()).
`parse_caption()` turns a caption back into structured mentions for evaluation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np

# The seed space: training clips have seeds >= TRAIN_SEED_BASE, held-out evaluation clips seeds
# below it, so a held-out clip can never be a training clip.
TRAIN_SEED_BASE = 1_000_000
VAL_SEED_BASE = 900_000  # the fixed validation batch training logs

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 200, 60),
    "blue": (45, 95, 240),
    "yellow": (240, 220, 40),
    "purple": (170, 60, 225),
    "white": (240, 240, 240),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: dict[str, float] = {"small": 0.46, "big": 0.76}  # object diameter as a fraction of a cell side
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLS: tuple[str, ...] = ("left", "centre", "right")
DIRECTIONS: dict[str, tuple[int, int]] = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "noise")
EVENT_KINDS: tuple[str, ...] = ("present", "appears", "moves", "leaves")

NOTHING = "nothing changes"
EMPTY = "the scene is empty"


@dataclass(frozen=True)
class WorldConfig:
    size: int = 128  # frame side in pixels (square frames)
    frames: int = 16  # clip length
    fps: float = 2.0
    max_objects: int = 3
    max_initial: int = 2  # objects present at frame 0 (keeps the first caption under 20 tokens)
    change_prob: float = 0.65  # probability that a frame t > 0 carries a change
    # relative odds of the change kinds: appears (per free object slot, doubled in an empty scene),
    # moves (per object with a free neighbour cell), leaves (per object). Training can raise the
    # rarer kinds (`casa train --world leave_weight=0.6`); evaluation keeps these defaults.
    appear_weight: float = 0.6
    move_weight: float = 0.9
    leave_weight: float = 0.3
    jitter: float = 0.08  # max object offset from its cell centre, fraction of a cell side
    noise_std: float = 4.0  # camera noise, in 8-bit levels
    flicker: float = 4.0  # max global brightness change per frame, in 8-bit levels


@dataclass(frozen=True)
class ObjectState:
    """One object as the ground truth knows it. cx, cy, diameter are fractions of the frame side."""

    colour: str
    shape: str
    size: str
    row: int
    col: int
    cx: float
    cy: float
    diameter: float

    @property
    def position(self) -> str:
        return f"{ROWS[self.row]} {COLS[self.col]}"

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Event:
    """A change (or, at frame 0, a presence) the caption reports.

    kind: "present" (frame 0 only), "appears", "moves" (direction + new position) or "leaves".
    """

    kind: str
    colour: str
    shape: str
    size: str | None = None
    position: str | None = None  # "top left" ...; the new position for moves, None for leaves
    direction: str | None = None


@dataclass(frozen=True)
class FrameTruth:
    index: int
    time: float  # seconds since the clip start
    objects: tuple[ObjectState, ...]
    events: tuple[Event, ...]
    caption: str


@dataclass
class Clip:
    seed: int
    config: WorldConfig
    frames: np.ndarray  # (F, H, W, 3) uint8
    truth: list[FrameTruth]

    @property
    def captions(self) -> list[str]:
        return [t.caption for t in self.truth]

    @property
    def timestamps(self) -> list[float]:
        return [t.time for t in self.truth]


# ---------------------------------------------------------------- captions


def scene_caption(objects: Iterable[ObjectState]) -> str:
    """The scene restated, as the first caption of a stream says it: every object in reading order
    (top to bottom, left to right), or EMPTY. It is also the true caption of a frame seen after a
    gap (frames of the stream not captioned): the changes since the last caption are not one event
    a frame any more, so the commentator starts over (server/overload.py)."""
    ordered = sorted(objects, key=lambda o: (o.row, o.col))
    if not ordered:
        return EMPTY
    return " and ".join(f"a {o.size} {o.colour} {o.shape} at the {o.position}" for o in ordered)


def caption_for(index: int, objects: tuple[ObjectState, ...], events: tuple[Event, ...]) -> str:
    """The commentator's line for one frame, from its events (at frame 0, the scene)."""
    if index == 0:
        return scene_caption(objects)
    if not events:
        return NOTHING
    (e,) = events
    if e.kind == "appears":
        return f"a {e.size} {e.colour} {e.shape} appears at the {e.position}"
    if e.kind == "moves":
        return f"the {e.colour} {e.shape} moves {e.direction} to the {e.position}"
    if e.kind == "leaves":
        return f"the {e.colour} {e.shape} leaves"
    raise ValueError(f"unknown event kind {e.kind!r}")


_POS = rf"(?P<row>{'|'.join(ROWS)}) (?P<col>{'|'.join(COLS)})"
_NAME = rf"(?P<colour>{'|'.join(COLOURS)}) (?P<shape>{'|'.join(SHAPES)})"
_CLAUSES = [
    ("present", re.compile(rf"a (?P<size>{'|'.join(SIZES)}) {_NAME} at the {_POS}")),
    ("appears", re.compile(rf"a (?P<size>{'|'.join(SIZES)}) {_NAME} appears at the {_POS}")),
    ("moves", re.compile(rf"the {_NAME} moves (?P<direction>{'|'.join(DIRECTIONS)}) to the {_POS}")),
    ("leaves", re.compile(rf"the {_NAME} leaves")),
]


def parse_caption(text: str) -> list[Event]:
    """Structured mentions in a caption (ours or a model's); unparsable pieces are ignored.

    Lenient on purpose: a model's caption with one wrong word still yields the clauses it got right,
    which is what attribute F1 wants to score.
    """
    out: list[tuple[int, Event]] = []
    text = " ".join(text.lower().replace(",", " ").split())
    for kind, pattern in _CLAUSES:
        for m in pattern.finditer(text):
            g = m.groupdict()
            pos = f"{g['row']} {g['col']}" if g.get("row") else None
            out.append(
                (m.start(), Event(kind, g["colour"], g["shape"], g.get("size"), pos, g.get("direction")))
            )
    return [e for _, e in sorted(out, key=lambda p: p[0])]


def vocabulary() -> list[str]:
    """Every word a ground-truth caption can use (for tokenizer training and tests)."""
    words = {"a", "the", "is", "at", "and", "appears", "moves", "to", "leaves", "nothing", "changes"}
    words |= {"scene", "empty"} | set(COLOURS) | set(SHAPES) | set(SIZES) | set(ROWS) | set(COLS)
    words |= set(DIRECTIONS)
    return sorted(words)


# ---------------------------------------------------------------- scene dynamics


class World:
    """The endless version of a clip: `step()` advances the scene by one frame, `render()` draws it.

    Frame 0 is produced by the first `step()`. The scene (objects, background) is seeded; camera noise
    for frame i comes from its own stream seeded by (seed, i), so any frame renders the same pixels
    whatever was rendered before it.
    """

    def __init__(self, seed: int, config: WorldConfig | None = None) -> None:
        self.seed = seed
        self.config = config or WorldConfig()
        self.rng = np.random.default_rng([seed, 0])
        self.background_kind, self._background_params = _sample_background(self.rng)
        self._background_cache: dict[int, np.ndarray] = {}
        self.objects: list[ObjectState] = []
        self.index = -1

    # -- dynamics

    def step(self) -> FrameTruth:
        self.index += 1
        events = self._initial() if self.index == 0 else self._change()
        objects = tuple(self.objects)
        caption = caption_for(self.index, objects, events)
        return FrameTruth(self.index, self.index / self.config.fps, objects, events, caption)

    def _initial(self) -> tuple[Event, ...]:
        n = int(self.rng.integers(0, self.config.max_initial + 1))
        events = []
        for _ in range(n):
            self.objects.append(self._new_object())
        # The first caption lists objects in reading order (top to bottom, left to right): an order
        # the model can see, where sampling order would make the first colour a coin toss.
        for obj in sorted(self.objects, key=lambda o: (o.row, o.col)):
            events.append(Event("present", obj.colour, obj.shape, obj.size, obj.position))
        return tuple(events)

    def _change(self) -> tuple[Event, ...]:
        if self.rng.random() >= self.config.change_prob:
            return ()
        n = len(self.objects)
        movable = [o for o in self.objects if self._moves_for(o)]
        c = self.config
        weights = {
            "appears": float(c.max_objects - n) * c.appear_weight * (2.0 if n == 0 else 1.0),
            "moves": c.move_weight * len(movable),
            "leaves": c.leave_weight * n,
        }
        total = sum(weights.values())
        if total <= 0:
            return ()
        kinds = list(weights)
        kind = kinds[int(self.rng.choice(len(kinds), p=[weights[k] / total for k in kinds]))]
        if kind == "appears":
            obj = self._new_object()
            self.objects.append(obj)
            return (Event("appears", obj.colour, obj.shape, obj.size, obj.position),)
        if kind == "leaves":
            obj = self.objects.pop(int(self.rng.integers(n)))
            return (Event("leaves", obj.colour, obj.shape),)
        obj = movable[int(self.rng.integers(len(movable)))]
        options = self._moves_for(obj)
        direction, (row, col) = options[int(self.rng.integers(len(options)))]
        moved = self._place(obj, row, col)
        self.objects[self.objects.index(obj)] = moved
        return (Event("moves", obj.colour, obj.shape, None, moved.position, direction),)

    def _free_cells(self) -> list[tuple[int, int]]:
        taken = {(o.row, o.col) for o in self.objects}
        return [(r, c) for r in range(3) for c in range(3) if (r, c) not in taken]

    def _moves_for(self, obj: ObjectState) -> list[tuple[str, tuple[int, int]]]:
        free = set(self._free_cells())
        out = []
        for name, (dr, dc) in DIRECTIONS.items():
            cell = (obj.row + dr, obj.col + dc)
            if cell in free:
                out.append((name, cell))
        return out

    def _new_object(self) -> ObjectState:
        used = {o.colour for o in self.objects}
        colours = [c for c in COLOURS if c not in used]
        colour = colours[int(self.rng.integers(len(colours)))]
        shape = SHAPES[int(self.rng.integers(len(SHAPES)))]
        size = list(SIZES)[int(self.rng.integers(len(SIZES)))]
        free = self._free_cells()
        row, col = free[int(self.rng.integers(len(free)))]
        base = ObjectState(colour, shape, size, row, col, 0.0, 0.0, SIZES[size] / 3.0)
        return self._place(base, row, col)

    def _place(self, obj: ObjectState, row: int, col: int) -> ObjectState:
        j = self.config.jitter
        dx, dy = self.rng.uniform(-j, j, size=2)
        return replace(obj, row=row, col=col, cx=(col + 0.5 + dx) / 3.0, cy=(row + 0.5 + dy) / 3.0)

    # -- rendering

    def render(self, truth: FrameTruth, size: int | None = None) -> np.ndarray:
        """Pixels (size, size, 3) uint8 of one frame's ground truth (default size: config.size)."""
        size = size or self.config.size
        if size not in self._background_cache:
            self._background_cache[size] = _background(self.background_kind, self._background_params, size)
        img = self._background_cache[size].copy()
        for obj in truth.objects:
            _draw(img, obj, size)
        noise_rng = np.random.default_rng([self.seed, 1, truth.index])
        img += noise_rng.uniform(-self.config.flicker, self.config.flicker)
        img += noise_rng.normal(0.0, self.config.noise_std, size=img.shape).astype(np.float32)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)

    def frames(self, size: int | None = None) -> Iterator[tuple[np.ndarray, FrameTruth]]:
        """Endless (pixels, truth) pairs: a camera that never stops."""
        while True:
            truth = self.step()
            yield self.render(truth, size), truth


def generate_clip(seed: int, config: WorldConfig | None = None) -> Clip:
    """One deterministic clip: config.frames frames with their ground truth."""
    world = World(seed, config)
    truth = [world.step() for _ in range(world.config.frames)]
    frames = np.stack([world.render(t) for t in truth])
    return Clip(seed, world.config, frames, truth)


# ---------------------------------------------------------------- drawing


def _sample_background(rng: np.random.Generator) -> tuple[str, dict]:
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    # dark, low-saturation tones: every object colour keeps a clear contrast against them
    base = rng.uniform(15, 85, size=3)
    params: dict = {"base": base}
    if kind == "gradient":
        params["other"] = rng.uniform(15, 85, size=3)
        params["angle"] = float(rng.uniform(0, 2 * math.pi))
    elif kind == "noise":
        params["grid"] = rng.uniform(-25, 25, size=(5, 5, 3))
        params["fine"] = int(rng.integers(0, 2**31))
    return kind, params


def _background(kind: str, params: dict, size: int) -> np.ndarray:
    img = np.broadcast_to(params["base"].astype(np.float32), (size, size, 3)).copy()
    u = (np.arange(size, dtype=np.float32) + 0.5) / size
    if kind == "gradient":
        a = params["angle"]
        t = (np.cos(a) * (u[None, :] - 0.5) + np.sin(a) * (u[:, None] - 0.5)) / math.sqrt(0.5) * 0.5 + 0.5
        img = img + t[..., None] * (params["other"] - params["base"]).astype(np.float32)
    elif kind == "noise":
        # smooth low-frequency blobs (bilinear upsampling of a 5x5 grid) plus fixed fine texture
        grid = params["grid"].astype(np.float32)
        pos = u * (grid.shape[0] - 1)
        i0 = np.clip(np.floor(pos).astype(int), 0, grid.shape[0] - 2)
        f = (pos - i0).astype(np.float32)
        rows = grid[i0] * (1 - f)[:, None, None] + grid[i0 + 1] * f[:, None, None]  # (S, 5, 3)
        smooth = rows[:, i0] * (1 - f)[None, :, None] + rows[:, i0 + 1] * f[None, :, None]  # (S, S, 3)
        fine = np.random.default_rng(params["fine"]).normal(0, 6, size=(size, size, 1)).astype(np.float32)
        img = img + smooth + fine
    return np.clip(img, 0, 255).astype(np.float32)


def _draw(img: np.ndarray, obj: ObjectState, size: int) -> None:
    """Alpha-blend one anti-aliased shape into img (H, W, 3) float32, in place."""
    r = obj.diameter * size / 2.0
    cx, cy = obj.cx * size, obj.cy * size
    x0, x1 = max(0, int(cx - r - 2)), min(size, int(cx + r + 3))
    y0, y1 = max(0, int(cy - r - 2)), min(size, int(cy + r + 3))
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xs + 0.5 - cx, ys + 0.5 - cy
    d = _inside_distance(obj.shape, dx, dy, r)  # > 0 inside, in pixels
    alpha = np.clip(d + 0.5, 0.0, 1.0)[..., None]
    colour = np.asarray(COLOURS[obj.colour], dtype=np.float32)
    patch = img[y0:y1, x0:x1]
    img[y0:y1, x0:x1] = patch * (1 - alpha) + colour * alpha


def _inside_distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return r - np.sqrt(dx * dx + dy * dy)
    if shape == "square":
        return 0.85 * r - np.maximum(np.abs(dx), np.abs(dy))
    if shape == "triangle":
        # upward equilateral triangle with circumradius r, centred on its centroid
        s3 = math.sqrt(3.0)
        bottom = r / 2.0 - dy
        left = (r + s3 * dx + dy) / 2.0  # the left edge's outward normal is (-sqrt3/2, -1/2)
        right = (r - s3 * dx + dy) / 2.0
        return np.minimum(bottom, np.minimum(left, right))
    if shape == "cross":
        w = 0.34 * r
        horizontal = np.minimum(r - np.abs(dx), w - np.abs(dy))
        vertical = np.minimum(w - np.abs(dx), r - np.abs(dy))
        return np.maximum(horizontal, vertical)
    raise ValueError(f"unknown shape {shape!r}")
