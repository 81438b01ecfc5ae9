"""ShapesWorld: scenes, rendering, prompts, questions, captions and the reference checker.

Implements the contract in ``shared/spec/shapes-world.md``. Coordinates are pixels
of a square canvas of side ``S`` with y growing downwards; a shape's size is its
circumradius ``r``. Numpy and Pillow only, so data workers never import torch.

Beyond the spec, for experiments such as teaching a trained model a new concept: a
``Vocabulary`` made by ``extend_vocabulary`` adds colours (name -> RGB) and the shapes of
``EXTRA_SHAPES`` to the spec's, and the sampling functions and the checker take it as
``vocab=``. Without it (the default) everything is the spec's world, unchanged.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from PIL import Image

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
TASKS: tuple[str, ...] = (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
)
QUESTION_FAMILIES: tuple[str, ...] = (
    "count_all",
    "count_shape",
    "color_of",
    "shape_of",
    "exists",
    "relation",
)
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
SPLIT_SEEDS: dict[str, int] = {"train": 1_000_003, "validation": 2_000_029, "test": 3_000_017}

MIN_SIZE = 128
MAX_OBJECTS = 4
RADIUS_RANGE = (0.10, 0.16)  # fractions of S
BORDER = 0.02  # fraction of S between a shape's circumcircle and the canvas edge
GAP = 0.04  # fraction of S between two circumcircles
# Pairs whose direction components lie within this of the 0.5 threshold are rejected,
# so relations survive pixel rounding of boxes and rendering at another size.
RELATION_MARGIN = 0.08
FOREGROUND_DISTANCE = 45.0
MIN_AREA_FRACTION = 0.004
# Ideal (u, v) = (A / (pi rmax^2), A / bbox area) per shape, spec section 6.
SHAPE_SIGNATURES: dict[str, tuple[float, float]] = {
    "circle": (1.0, math.pi / 4),
    "square": (2 / math.pi, 1.0),
    "triangle": (3 * math.sqrt(3) / (4 * math.pi), 0.5),
}

# Not in the spec: shapes a Vocabulary may add. A rectangle is axis-aligned and three times as wide
# as it is high, its corners on the circumcircle: half-sides 3r / sqrt(10) and r / sqrt(10).
EXTRA_SHAPES: tuple[str, ...] = ("rectangle",)
EXTRA_SHAPE_SIGNATURES: dict[str, tuple[float, float]] = {"rectangle": (1.2 / math.pi, 1.0)}
_SIGNATURES = {**SHAPE_SIGNATURES, **EXTRA_SHAPE_SIGNATURES}
# Extra colours must stand this far (RGB distance) from every other colour of their vocabulary.
MIN_COLOR_DISTANCE = 60.0

_SQRT3 = math.sqrt(3.0)
_SQRT10 = math.sqrt(10.0)
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ShapeObject:
    """One flat shape: name, palette colour, centre and circumradius in pixels."""

    shape: str
    color: str
    cx: float
    cy: float
    r: float
    # Only for a colour outside the spec's palette (see Vocabulary); None for the spec's colours.
    rgb: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES and self.shape not in EXTRA_SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.rgb is None:
            if self.color not in PALETTE:
                raise ValueError(f"unknown color {self.color!r}; expected one of {COLORS}")
            return
        rgb = _check_rgb(self.rgb, self.color)
        if self.color in PALETTE:
            if rgb != PALETTE[self.color]:
                raise ValueError(f"color {self.color!r} is {PALETTE[self.color]} in the spec's palette, not {rgb}")
            rgb = None
        object.__setattr__(self, "rgb", rgb)

    @property
    def fill(self) -> tuple[int, int, int]:
        """The RGB the object is drawn with."""
        return PALETTE[self.color] if self.rgb is None else self.rgb


@dataclass(frozen=True)
class Scene:
    """A canvas side length and the objects drawn on it."""

    size: int
    objects: tuple[ShapeObject, ...]


@dataclass(frozen=True)
class GenPrompt:
    """A shapes-GenEval prompt: task name, prompt text and what the checker needs."""

    task: str
    text: str
    # Keys: "shapes" (always, in prompt order), "colors" (paired with shapes),
    # "count" (counting) and "relation" (position, of shapes[0] relative to shapes[1]).
    spec: dict


@dataclass(frozen=True)
class Question:
    """A shapes-VQA question with its one-word answer."""

    family: str
    text: str
    answer: str


@dataclass(frozen=True)
class DetectedObject:
    """An object found by the checker; bbox is (x0, y0, x1, y1) with exclusive ends."""

    shape: str
    color: str
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]
    area: int


# ---------------------------------------------------------------------------
# Vocabularies beyond the spec


@dataclass(frozen=True)
class Vocabulary:
    """The colours (name -> RGB) and shapes that scenes, prompts, questions and the checker use."""

    palette: Mapping[str, tuple[int, int, int]]
    shapes: tuple[str, ...]

    @property
    def colors(self) -> tuple[str, ...]:
        """Colour names, in palette order."""
        return tuple(self.palette)

    def rgb(self, color: str) -> tuple[int, int, int] | None:
        """What an object of ``color`` carries as ``rgb``: None for the spec's colours."""
        return None if color in PALETTE or color not in self.palette else self.palette[color]


SPEC_VOCABULARY = Vocabulary(MappingProxyType(dict(PALETTE)), SHAPES)


def _check_rgb(rgb: Sequence[int], name: str) -> tuple[int, int, int]:
    values = tuple(rgb) if isinstance(rgb, (tuple, list)) else ()
    if len(values) != 3 or not all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in values):
        raise ValueError(f"color {name!r} needs three integers in 0..255 as its RGB, got {rgb!r}")
    return tuple(int(v) for v in values)


def extend_vocabulary(
    colors: Mapping[str, Sequence[int]] | None = None,
    shapes: Sequence[str] = (),
    base: Vocabulary = SPEC_VOCABULARY,
) -> Vocabulary:
    """``base`` (the spec's vocabulary) with extra colours (name -> RGB) and shapes of ``EXTRA_SHAPES``.

    A colour name is one lower-case word that is not otherwise taken; its RGB must lie far enough
    from the background for the checker to see it (over ``FOREGROUND_DISTANCE``) and from every
    other colour for the checker to tell them apart (``MIN_COLOR_DISTANCE``).
    """
    palette = {name: _check_rgb(rgb, name) for name, rgb in base.palette.items()}
    taken = {*SHAPES, *EXTRA_SHAPES, *_NUMBER_WORDS, "yes", "no"}
    for name, rgb in (colors or {}).items():
        if not isinstance(name, str) or not re.fullmatch(r"[a-z]+", name):
            raise ValueError(f"a color name must be one lower-case word, got {name!r}")
        if name in palette or name in taken:
            raise ValueError(f"color name {name!r} is already taken")
        rgb = _check_rgb(rgb, name)
        if math.dist(rgb, BACKGROUND) <= FOREGROUND_DISTANCE:
            raise ValueError(f"color {name!r} {rgb} is too close to the background {BACKGROUND}: "
                             f"the checker needs an RGB distance over {FOREGROUND_DISTANCE:g}")
        for other, other_rgb in palette.items():
            if math.dist(rgb, other_rgb) < MIN_COLOR_DISTANCE:
                raise ValueError(f"color {name!r} {rgb} is too close to {other!r} {other_rgb}: "
                                 f"keep an RGB distance of at least {MIN_COLOR_DISTANCE:g}")
        palette[name] = rgb
    names = list(base.shapes)
    for shape in shapes:
        if shape not in EXTRA_SHAPES:
            raise ValueError(f"cannot add shape {shape!r}: the shapes beyond the spec are {EXTRA_SHAPES}")
        if shape in names:
            raise ValueError(f"shape {shape!r} is already in the vocabulary")
        names.append(shape)
    return Vocabulary(MappingProxyType(palette), tuple(names))


# ---------------------------------------------------------------------------
# Words


def with_article(phrase: str) -> str:
    """Prefix ``a`` or ``an`` (before a vowel) to a noun phrase."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def plural(shape: str) -> str:
    """Plural of a shape name."""
    return shape + "s"


# ---------------------------------------------------------------------------
# Geometry and rendering


def check_size(size: int) -> int:
    """Return ``size`` if it is a valid canvas side (multiple of 16, >= 128), else raise."""
    if int(size) != size or size < MIN_SIZE or size % 16:
        raise ValueError(f"canvas size must be a multiple of 16 and >= {MIN_SIZE}, got {size}")
    return int(size)


def bbox(obj: ShapeObject) -> Box:
    """Exact bounding box (x0, y0, x1, y1) of a shape's geometry."""
    if obj.shape == "circle":
        hx, top, bottom = obj.r, obj.r, obj.r
    elif obj.shape == "square":
        hx = top = bottom = obj.r / math.sqrt(2.0)
    elif obj.shape == "rectangle":
        hx, top, bottom = 3 * obj.r / _SQRT10, obj.r / _SQRT10, obj.r / _SQRT10
    else:  # apex at -90 degrees, base corners at 30 and 150 degrees
        hx, top, bottom = obj.r * _SQRT3 / 2, obj.r, obj.r / 2
    return (obj.cx - hx, obj.cy - top, obj.cx + hx, obj.cy + bottom)


def _scaled(obj: ShapeObject, factor: float) -> ShapeObject:
    if factor == 1.0:
        return obj
    return ShapeObject(obj.shape, obj.color, obj.cx * factor, obj.cy * factor, obj.r * factor, obj.rgb)


def _inside(obj: ShapeObject, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean mask of the points (x, y) that lie inside the shape."""
    dx, dy = x - obj.cx, y - obj.cy
    if obj.shape == "circle":
        return dx * dx + dy * dy <= obj.r * obj.r
    if obj.shape == "square":
        half = obj.r / math.sqrt(2.0)
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if obj.shape == "rectangle":
        return (np.abs(dx) <= 3 * obj.r / _SQRT10) & (np.abs(dy) <= obj.r / _SQRT10)
    # Equilateral triangle, apex up: half-width grows by 1/sqrt(3) per pixel below the apex.
    return (dy <= obj.r / 2) & (np.abs(dx) * _SQRT3 <= dy + obj.r)


def render(scene: Scene, size: int | None = None) -> Image.Image:
    """Rasterise a scene (pixel-centre rule, no anti-aliasing), optionally at another size."""
    side = check_size(scene.size if size is None else size)
    factor = side / scene.size
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    for obj in scene.objects:
        obj = _scaled(obj, factor)
        x0, y0, x1, y1 = bbox(obj)
        # Only the pixels whose centres can fall inside the box are tested.
        i0, j0 = max(math.floor(x0), 0), max(math.floor(y0), 0)
        i1, j1 = min(math.ceil(x1), side), min(math.ceil(y1), side)
        if i0 >= i1 or j0 >= j1:
            continue
        xs = np.arange(i0, i1, dtype=np.float64)[None, :] + 0.5
        ys = np.arange(j0, j1, dtype=np.float64)[:, None] + 0.5
        canvas[j0:j1, i0:i1][_inside(obj, xs, ys)] = obj.fill
    return Image.fromarray(canvas, "RGB")


# ---------------------------------------------------------------------------
# Relations (GenEval rule on bounding boxes)


def _direction(box_a: Sequence[float], box_b: Sequence[float]) -> tuple[float, float] | None:
    """GenEval's margin-revised unit direction from B to A, or None when there is none."""
    ax0, ay0, ax1, ay1 = box_a
    bx0, by0, bx1, by1 = box_b
    offset = np.array([(ax0 + ax1 - bx0 - bx1) / 2, (ay0 + ay1 - by0 - by1) / 2])
    dims = np.array([ax1 - ax0 + bx1 - bx0, ay1 - ay0 + by1 - by0])
    revised = np.sign(offset) * np.maximum(np.abs(offset) - 0.1 * dims, 0.0)
    if np.all(np.abs(revised) < 1e-3):
        return None
    dx, dy = revised / np.linalg.norm(offset)
    return float(dx), float(dy)


def box_relation(box_a: Sequence[float], box_b: Sequence[float]) -> set[str]:
    """Relations of box A relative to box B (spec section 3); boxes are (x0, y0, x1, y1)."""
    direction = _direction(box_a, box_b)
    if direction is None:
        return set()
    dx, dy = direction
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


def relation(a: ShapeObject, b: ShapeObject) -> set[str]:
    """Relations of object A relative to object B, from their exact bounding boxes."""
    return box_relation(bbox(a), bbox(b))


def relation_is_clear(a: ShapeObject, b: ShapeObject, margin: float = RELATION_MARGIN) -> bool:
    """True when no direction component of A vs B is within ``margin`` of the 0.5 threshold."""
    direction = _direction(bbox(a), bbox(b))
    if direction is None:
        return True
    return all(abs(abs(d) - 0.5) >= margin for d in direction)


# ---------------------------------------------------------------------------
# Scene sampling


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _fits(candidate: ShapeObject, placed: Iterable[ShapeObject], size: int) -> bool:
    """Placement rule: circumcircles apart by the gap, and every pair relation unambiguous."""
    for other in placed:
        distance = math.hypot(candidate.cx - other.cx, candidate.cy - other.cy)
        if distance < candidate.r + other.r + GAP * size:
            return False
        if not relation_is_clear(candidate, other):
            return False
    return True


def _place(
    rng: np.random.Generator,
    size: int,
    items: Sequence[tuple[str, str]],
    accept: Callable[[list[ShapeObject]], bool] | None = None,
    tries: int = 2000,
    vocab: Vocabulary | None = None,
) -> Scene:
    """Place (shape, colour) items by rejection sampling; objects come back in random order."""
    check_size(size)
    vocab = vocab or SPEC_VOCABULARY
    for _ in range(tries):
        placed: list[ShapeObject] = []
        for shape, color in items:
            for _ in range(100):
                r = rng.uniform(RADIUS_RANGE[0] * size, RADIUS_RANGE[1] * size)
                lo, hi = r + BORDER * size, size - r - BORDER * size
                cx, cy = rng.uniform(lo, hi, size=2)
                candidate = ShapeObject(shape, color, float(cx), float(cy), float(r), vocab.rgb(color))
                if _fits(candidate, placed, size):
                    placed.append(candidate)
                    break
            else:
                break
        if len(placed) == len(items) and (accept is None or accept(placed)):
            order = rng.permutation(len(placed))
            return Scene(size, tuple(placed[k] for k in order))
    raise RuntimeError(f"could not place {len(items)} objects on a {size}px canvas")


def sample_scene(
    rng: np.random.Generator, size: int = 128, n_objects: int | None = None, vocab: Vocabulary | None = None
) -> Scene:
    """Random scene of 1-4 objects with random shapes and colours (of ``vocab``, default the spec's)."""
    vocab = vocab or SPEC_VOCABULARY
    if n_objects is None:
        n_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    if not 1 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be in 1..{MAX_OBJECTS}, got {n_objects}")
    items = [(_pick(rng, vocab.shapes), _pick(rng, vocab.colors)) for _ in range(n_objects)]
    return _place(rng, size, items, vocab=vocab)


# ---------------------------------------------------------------------------
# Generation prompts (shapes-GenEval)


def _two_distinct(rng: np.random.Generator, options: Sequence[str]) -> tuple[str, str]:
    first, second = rng.choice(len(options), size=2, replace=False)
    return options[int(first)], options[int(second)]


def sample_prompt(rng: np.random.Generator, task: str, vocab: Vocabulary | None = None) -> GenPrompt:
    """Random prompt of one GenEval task, with the exact spec template (words of ``vocab``)."""
    vocab = vocab or SPEC_VOCABULARY
    shapes, colors = vocab.shapes, vocab.colors
    if task == "single_object":
        shape = _pick(rng, shapes)
        return GenPrompt(task, f"a photo of {with_article(shape)}", {"shapes": (shape,)})
    if task == "two_object":
        a, b = _two_distinct(rng, shapes)
        text = f"a photo of {with_article(a)} and {with_article(b)}"
        return GenPrompt(task, text, {"shapes": (a, b)})
    if task == "counting":
        shape, n = _pick(rng, shapes), int(rng.integers(2, MAX_OBJECTS + 1))
        text = f"a photo of {COUNT_WORDS[n]} {plural(shape)}"
        return GenPrompt(task, text, {"shapes": (shape,), "count": n})
    if task == "colors":
        shape, color = _pick(rng, shapes), _pick(rng, colors)
        text = f"a photo of {with_article(f'{color} {shape}')}"
        return GenPrompt(task, text, {"shapes": (shape,), "colors": (color,)})
    if task == "position":
        (a, b), rel = _two_distinct(rng, shapes), _pick(rng, RELATIONS)
        text = f"a photo of {with_article(a)} {rel} {with_article(b)}"
        return GenPrompt(task, text, {"shapes": (a, b), "relation": rel})
    if task == "color_attr":
        (a, b), (ca, cb) = _two_distinct(rng, shapes), _two_distinct(rng, colors)
        text = f"a photo of {with_article(f'{ca} {a}')} and {with_article(f'{cb} {b}')}"
        return GenPrompt(task, text, {"shapes": (a, b), "colors": (ca, cb)})
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def scene_for_prompt(
    rng: np.random.Generator, prompt: GenPrompt, size: int = 128, vocab: Vocabulary | None = None
) -> Scene:
    """Random scene that satisfies a prompt; distractors only use shapes the prompt never names.

    Free colours and distractor shapes come from ``vocab`` (default the spec's).
    """
    vocab = vocab or SPEC_VOCABULARY
    spec = prompt.spec
    shapes = list(spec["shapes"])
    if prompt.task == "counting":
        shapes = shapes * spec["count"]
    colors = list(spec.get("colors", ()))
    items = [
        (s, colors[k] if k < len(colors) else _pick(rng, vocab.colors)) for k, s in enumerate(shapes)
    ]
    # Distractors of unnamed shapes cannot change counts, colours or relations the prompt states.
    others = [s for s in vocab.shapes if s not in spec["shapes"]]
    if prompt.task != "single_object" and others:  # single_object scenes hold one object (spec)
        for _ in range(int(rng.integers(0, MAX_OBJECTS - len(items) + 1))):
            items.append((_pick(rng, others), _pick(rng, vocab.colors)))

    accept = None
    if prompt.task == "position":

        def accept(placed: list[ShapeObject]) -> bool:
            return spec["relation"] in relation(placed[0], placed[1])

    return _place(rng, size, items, accept, vocab=vocab)


# ---------------------------------------------------------------------------
# Questions (shapes-VQA)


def _unique(values: Iterable[str]) -> list[str]:
    """Values that occur exactly once, in first-seen order."""
    counts = Counter(values)
    return [value for value, count in counts.items() if count == 1]


def sample_question(
    rng: np.random.Generator, scene: Scene, family: str | None = None, vocab: Vocabulary | None = None
) -> Question | None:
    """Random question about a scene (one family or any askable one); None if not askable.

    ``vocab`` (default the spec's) gives the shapes and colours a question may name that the scene lacks.
    """
    vocab = vocab or SPEC_VOCABULARY
    if family is None:
        for candidate in rng.permutation(len(QUESTION_FAMILIES)):
            question = sample_question(rng, scene, QUESTION_FAMILIES[int(candidate)], vocab)
            if question is not None:
                return question
        return None

    objects = scene.objects
    if family == "count_all":
        return Question(family, "How many objects are there?", str(len(objects)))
    if family == "count_shape":
        shape = _pick(rng, vocab.shapes)
        count = sum(o.shape == shape for o in objects)
        return Question(family, f"How many {plural(shape)} are there?", str(count))
    if family == "color_of":
        unique = _unique(o.shape for o in objects)
        if not unique:
            return None
        shape = _pick(rng, unique)
        color = next(o.color for o in objects if o.shape == shape)
        return Question(family, f"What color is the {shape}?", color)
    if family == "shape_of":
        unique = _unique(o.color for o in objects)
        if not unique:
            return None
        color = _pick(rng, unique)
        shape = next(o.shape for o in objects if o.color == color)
        return Question(family, f"What shape is the {color} object?", shape)
    if family == "exists":
        present = sorted({(o.color, o.shape) for o in objects})
        absent = [(c, s) for c in vocab.colors for s in vocab.shapes if (c, s) not in present]
        # A fair coin picks the answer so that yes and no are balanced.
        answer = "yes" if rng.random() < 0.5 else "no"
        pool = present if answer == "yes" else absent
        color, shape = pool[int(rng.integers(len(pool)))]
        return Question(family, f"Is there {with_article(f'{color} {shape}')}?", answer)
    if family == "relation":
        names = [(o.color, o.shape) for o in objects]
        unique = [o for o in objects if names.count((o.color, o.shape)) == 1]
        candidates = {"yes": [], "no": []}
        for a in unique:
            for b in unique:
                if a is b or not relation_is_clear(a, b):
                    continue
                holds = relation(a, b)
                for rel in RELATIONS:
                    candidates["yes" if rel in holds else "no"].append((a, rel, b))
        if not candidates["yes"] and not candidates["no"]:
            return None
        answer = "yes" if rng.random() < 0.5 else "no"
        if not candidates[answer]:
            answer = "no" if answer == "yes" else "yes"
        a, rel, b = candidates[answer][int(rng.integers(len(candidates[answer])))]
        text = f"Is the {a.color} {a.shape} {rel} the {b.color} {b.shape}?"
        return Question(family, text, answer)
    raise ValueError(f"unknown question family {family!r}; expected one of {QUESTION_FAMILIES}")


def questions_for_scene(rng: np.random.Generator, scene: Scene, vocab: Vocabulary | None = None) -> list[Question]:
    """One question of every family that is askable for the scene, in family order."""
    questions = (sample_question(rng, scene, family, vocab) for family in QUESTION_FAMILIES)
    return [q for q in questions if q is not None]


def answer_word(answer_text: str) -> str:
    """The answer's first word, lower-cased and without punctuation ("" for an empty answer)."""
    words = answer_text.split()
    return words[0].lower().strip(string.punctuation) if words else ""


def score_answer(answer_text: str, expected: str) -> bool:
    """True when the answer's first word, lower-cased and without punctuation, is expected."""
    word = answer_word(answer_text)
    return bool(word) and word == expected.lower()


# ---------------------------------------------------------------------------
# Dense captions

_ROWS = ("top", "middle", "bottom")
_COLUMNS = ("left", "center", "right")
_CAPTION_OBJECT = re.compile(
    r"\b(?:(a|an|one|two|three|four)\s+)?"
    rf"({'|'.join(COLORS)})\s+({'|'.join(SHAPES)})(s?)\b",
    re.IGNORECASE,
)
_NUMBER_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}


def _cell(obj: ShapeObject, size: int) -> tuple[int, int]:
    """(row, column) of the third of the canvas that holds the object's centre."""
    return min(int(3 * obj.cy / size), 2), min(int(3 * obj.cx / size), 2)


def _location(obj: ShapeObject, size: int) -> str:
    """Where the object's centre lies, in words."""
    row, column = _cell(obj, size)
    if (row, column) == (1, 1):
        return "in the center"
    return f"at the {_ROWS[row]} {_COLUMNS[column]}"


def caption(scene: Scene) -> str:
    """Deterministic dense caption listing objects in reading order with their locations."""
    ordered = sorted(scene.objects, key=lambda o: (_cell(o, scene.size), o.cy, o.cx))
    parts = [f"{with_article(f'{o.color} {o.shape}')} {_location(o, scene.size)}" for o in ordered]
    return ", ".join(parts) + "."


def parse_caption(text: str) -> list[tuple[str, str]]:
    """(colour, shape) of every object a caption mentions, in order; counts repeat entries."""
    found = []
    for number, color, shape, plural_s in _CAPTION_OBJECT.findall(text):
        count = _NUMBER_WORDS.get(number.lower(), 2 if plural_s else 1)
        found.extend([(color.lower(), shape.lower())] * count)
    return found


# ---------------------------------------------------------------------------
# Fixed held-out sets


def test_prompts(n_per_task: int = 100, seed: int = SPLIT_SEEDS["test"]) -> list[GenPrompt]:
    """Fixed shapes-GenEval prompt set: ``n_per_task`` prompts of each task, in task order."""
    prompts = []
    for index, task in enumerate(TASKS):
        # One stream per task, so changing one task's size leaves the others' prompts alone.
        rng = np.random.default_rng([seed, index])
        prompts.extend(sample_prompt(rng, task) for _ in range(n_per_task))
    return prompts


def test_questions(
    n_per_family: int = 100, seed: int = SPLIT_SEEDS["test"], size: int = 128
) -> list[tuple[Scene, Question]]:
    """Fixed shapes-VQA set: ``n_per_family`` (scene, question) pairs of each family."""
    pairs = []
    for index, family in enumerate(QUESTION_FAMILIES):
        rng = np.random.default_rng([seed, len(TASKS) + index])
        count = 0
        while count < n_per_family:
            scene = sample_scene(rng, size)
            question = sample_question(rng, scene, family)
            if question is not None:
                pairs.append((scene, question))
                count += 1
    return pairs


# Stop pytest from collecting the two helpers above when tests import them by name.
test_prompts.__test__ = False  # type: ignore[attr-defined]
test_questions.__test__ = False  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------
# Reference checker (spec section 6)


def _label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected component labels (0 = background, 1..n) via union-find over row runs."""
    height, width = mask.shape
    padded = np.zeros((height, width + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    # nonzero scans row-major, so run starts and ends pair up in order; ends are exclusive.
    run_rows, starts = np.nonzero(edges == 1)
    ends = np.nonzero(edges == -1)[1]
    row_first = np.searchsorted(run_rows, np.arange(height + 1)).tolist()
    starts_list, ends_list = starts.tolist(), ends.tolist()
    parent = list(range(len(starts_list)))

    def find(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for y in range(1, height):
        # Two-pointer sweep over the sorted runs of rows y - 1 and y: runs touch
        # 4-connectedly exactly when their column ranges overlap.
        p, p_end = row_first[y - 1], row_first[y]
        k, k_end = row_first[y], row_first[y + 1]
        while p < p_end and k < k_end:
            if starts_list[p] < ends_list[k] and starts_list[k] < ends_list[p]:
                root_p, root_k = find(p), find(k)
                if root_p != root_k:
                    parent[max(root_p, root_k)] = min(root_p, root_k)
            if ends_list[p] < ends_list[k]:
                p += 1
            else:
                k += 1

    roots = np.array([find(k) for k in range(len(parent))], dtype=np.int64)
    unique_roots, run_labels = np.unique(roots, return_inverse=True)
    labels = np.zeros((height, width), dtype=np.int32)
    for k, (row, start, end) in enumerate(zip(run_rows.tolist(), starts_list, ends_list)):
        labels[row, start:end] = run_labels[k] + 1
    return labels, len(unique_roots)


def _classify_shape(area: int, rmax: float, box_area: int, shapes: Sequence[str] = SHAPES) -> str:
    u = area / (math.pi * rmax * rmax) if rmax > 0 else 1.0
    v = area / box_area
    return min(shapes, key=lambda s: math.dist((u, v), _SIGNATURES[s]))


def _nearest_color(rgb: np.ndarray, palette: Mapping[str, tuple[int, int, int]] = PALETTE) -> str:
    return min(palette, key=lambda c: float(np.sum((rgb - np.array(palette[c])) ** 2)))


def detect_objects(image: Image.Image | np.ndarray, vocab: Vocabulary | None = None) -> list[DetectedObject]:
    """Find objects in an image with the spec's reference checker, in label order.

    Shapes and colours are the nearest of ``vocab`` (default the spec's).
    """
    vocab = vocab or SPEC_VOCABULARY
    if isinstance(image, Image.Image):
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    else:
        pixels = np.asarray(image, dtype=np.float64)
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 RGB array, got shape {pixels.shape}")
    height, width = pixels.shape[:2]
    distance = np.linalg.norm(pixels - np.array(BACKGROUND, dtype=np.float64), axis=2)
    labels, count = _label_components(distance > FOREGROUND_DISTANCE)
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    min_area = MIN_AREA_FRACTION * height * width

    found = []
    for label in range(1, count + 1):
        if areas[label] < min_area:
            continue
        rows, cols = np.nonzero(labels == label)
        xs, ys = cols + 0.5, rows + 0.5
        cx, cy = float(xs.mean()), float(ys.mean())
        rmax = float(np.sqrt(((xs - cx) ** 2 + (ys - cy) ** 2).max()))
        box = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
        area = int(areas[label])
        box_area = (box[2] - box[0]) * (box[3] - box[1])
        found.append(
            DetectedObject(
                shape=_classify_shape(area, rmax, box_area, vocab.shapes),
                color=_nearest_color(np.median(pixels[rows, cols], axis=0), vocab.palette),
                bbox=box,
                centroid=(cx, cy),
                area=area,
            )
        )
    return found


def score_detections(objects: Sequence[DetectedObject], prompt: GenPrompt) -> bool:
    """GenEval verdict for detected objects against a prompt."""
    spec = prompt.spec
    shapes = spec["shapes"]

    def having(shape: str, color: str | None = None) -> list[DetectedObject]:
        return [o for o in objects if o.shape == shape and (color is None or o.color == color)]

    if prompt.task in ("single_object", "two_object"):
        return all(having(s) for s in shapes)
    if prompt.task == "counting":
        return len(having(shapes[0])) == spec["count"]
    if prompt.task in ("colors", "color_attr"):
        return all(having(s, c) for s, c in zip(shapes, spec["colors"], strict=True))
    if prompt.task == "position":
        return any(
            spec["relation"] in box_relation(a.bbox, b.bbox)
            for a in having(shapes[0])
            for b in having(shapes[1])
            if a is not b
        )
    raise ValueError(f"unknown task {prompt.task!r}; expected one of {TASKS}")


def score_image(image: Image.Image | np.ndarray, prompt: GenPrompt, vocab: Vocabulary | None = None) -> bool:
    """True when the image satisfies the prompt under GenEval semantics (checked with ``vocab``)."""
    return score_detections(detect_objects(image, vocab), prompt)


def score_images(
    pairs: Iterable[tuple[Image.Image | np.ndarray, GenPrompt]], vocab: Vocabulary | None = None
) -> dict[str, float]:
    """Per-task accuracy of (image, prompt) pairs plus ``overall``, the mean of task scores."""
    results: dict[str, list[bool]] = {}
    for image, prompt in pairs:
        results.setdefault(prompt.task, []).append(score_image(image, prompt, vocab))
    scores = {task: float(np.mean(results[task])) for task in TASKS if task in results}
    scores["overall"] = float(np.mean(list(scores.values()))) if scores else 0.0
    return scores
