"""The demo's data set, **Shapes** (built in, no download): 32 x 32 RGB images of one shape that varies in kind (4),
colour (6), size (2) and position (4 quadrants) -- 192 combinations -- rendered with jitter in position, size,
shade and background noise, each with five captions written from templates and synonyms ("a big red disc in the
upper left", ...). Composed queries pair a reference image with a modification ("make it blue") and the target
image that has the modified attributes. Everything is a deterministic function of a seed.

(Moved here from ``xmodal.data``, which keeps only what reads your own data; the old names still work there for
one release, with a ``DeprecationWarning``.)
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..data import IMAGE_SIZE

__all__ = ["IMAGE_SIZE", "KINDS", "COLOURS", "SIZES", "POSITIONS", "ATTRIBUTES", "Attributes", "all_attributes", "render",
           "caption", "modification", "vocabulary_words", "random_modification", "ShapesDataset", "ComposedQueries",
           "composed_triples"]

KINDS = ["circle", "square", "triangle", "cross"]
COLOURS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.9, 0.1),
    "purple": (0.6, 0.15, 0.8),
    "cyan": (0.1, 0.85, 0.9),
}
SIZES = ["small", "large"]
POSITIONS = ["top left", "top right", "bottom left", "bottom right"]
ATTRIBUTES = ("kind", "colour", "size", "position")

_KIND_WORDS = {"circle": ["circle", "disc", "round shape"], "square": ["square", "box"],
               "triangle": ["triangle"], "cross": ["cross", "plus sign"]}
_SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big"]}
_POSITION_WORDS = {p: [p, p.replace("top", "upper").replace("bottom", "lower")] for p in POSITIONS}
_TEMPLATES = [
    "a {size} {colour} {kind} in the {position}",
    "{size} {colour} {kind}, {position}",
    "there is a {size} {kind} coloured {colour} at the {position}",
    "the {position} has a {size} {colour} {kind}",
    "{colour} {kind} ({size}) in the {position} corner",
    "an image of a {colour} {kind} that is {size}, placed {position}",
]


@dataclass(frozen=True)
class Attributes:
    kind: str
    colour: str
    size: str
    position: str

    @property
    def index(self) -> int:
        """A unique id in [0, 192)."""
        return (
            ((KINDS.index(self.kind) * len(COLOURS) + list(COLOURS).index(self.colour)) * len(SIZES)
             + SIZES.index(self.size)) * len(POSITIONS) + POSITIONS.index(self.position)
        )

    def replace(self, attribute: str, value: str) -> "Attributes":
        return Attributes(**{**self.__dict__, attribute: value})


def all_attributes() -> List[Attributes]:
    return [Attributes(k, c, s, p) for k in KINDS for c in COLOURS for s in SIZES for p in POSITIONS]


def render(attrs: Attributes, rng: random.Random) -> Tensor:
    """One ``[3, 32, 32]`` float image in [0, 1] with the given attributes, jittered by ``rng``."""
    n = IMAGE_SIZE
    q = POSITIONS.index(attrs.position)
    cx = (0.25 if q % 2 == 0 else 0.75) * n + rng.uniform(-2, 2)
    cy = (0.25 if q < 2 else 0.75) * n + rng.uniform(-2, 2)
    r = (rng.uniform(3.0, 4.0) if attrs.size == "small" else rng.uniform(6.0, 7.5))
    ys, xs = torch.meshgrid(torch.arange(n, dtype=torch.float32) + 0.5, torch.arange(n, dtype=torch.float32) + 0.5, indexing="ij")
    dx, dy = xs - cx, ys - cy
    if attrs.kind == "circle":
        mask = dx * dx + dy * dy <= r * r
    elif attrs.kind == "square":
        mask = (dx.abs() <= r * 0.85) & (dy.abs() <= r * 0.85)
    elif attrs.kind == "triangle":  # apex up
        mask = (dy >= -r) & (dy <= r * 0.8) & (dx.abs() <= (dy + r) * 0.6)
    else:  # cross
        arm = max(r / 3, 1.0)
        mask = ((dx.abs() <= arm) & (dy.abs() <= r)) | ((dy.abs() <= arm) & (dx.abs() <= r))
    g = torch.Generator().manual_seed(rng.getrandbits(31))
    shade = rng.uniform(0.85, 1.1)
    colour = torch.tensor(COLOURS[attrs.colour]).mul(shade).clamp(0, 1)
    background = 0.12 + 0.05 * torch.rand(3, 1, 1, generator=g)
    image = background + 0.04 * torch.randn(3, n, n, generator=g)
    image = torch.where(mask, colour[:, None, None].expand(3, n, n), image)
    return image.clamp(0, 1)


def caption(attrs: Attributes, rng: random.Random, template: Optional[int] = None) -> str:
    t = _TEMPLATES[rng.randrange(len(_TEMPLATES)) if template is None else template % len(_TEMPLATES)]
    return t.format(
        kind=rng.choice(_KIND_WORDS[attrs.kind]),
        colour=attrs.colour,
        size=rng.choice(_SIZE_WORDS[attrs.size]),
        position=rng.choice(_POSITION_WORDS[attrs.position]),
    )


#: attribute -> the requests to change it, ``{v}`` = a word for the new value
_MODIFICATIONS = {
    "colour": ["make it {v}", "change the colour to {v}", "the same but {v}", "paint it {v}"],
    "kind": ["turn it into a {v}", "make it a {v}", "a {v} instead", "change the shape to a {v}"],
    "size": ["make it {v}", "the same but {v}", "change the size to {v}"],
    "position": ["move it to the {v}", "put it in the {v}", "the same but in the {v}"],
}
_VALUE_WORDS = {"kind": _KIND_WORDS, "size": _SIZE_WORDS, "position": _POSITION_WORDS}


def modification(attribute: str, value: str, rng: random.Random) -> str:
    """Text that asks to change one attribute of the reference image."""
    # colours are named as they are; other values by one of their synonyms (drawn before the template)
    word = value if attribute == "colour" else rng.choice(_VALUE_WORDS[attribute][value])
    return rng.choice(_MODIFICATIONS[attribute]).format(v=word)


def vocabulary_words() -> List[str]:
    """Every word a built-in caption or modification text can contain, sorted and unique: fit a ``Tokenizer``
    on these to read the built-in data without unknown words."""
    texts = list(COLOURS) + [w for words in _VALUE_WORDS.values() for ws in words.values() for w in ws]
    texts += [re.sub(r"\{\w+\}", " ", t) for t in _TEMPLATES + [t for ts in _MODIFICATIONS.values() for t in ts]]
    # "kind" and "position" occur in no text, but the default vocabulary has always held them (it once took the
    # templates' placeholder names for words); keeping them keeps the model a seed builds as it was
    texts += ["kind", "position"]
    return sorted({w for t in texts for w in re.findall(r"[a-z0-9]+", t.lower())})  # as Tokenizer.split splits


_VALUES = {"kind": KINDS, "colour": list(COLOURS), "size": SIZES, "position": POSITIONS}


def random_modification(attrs: Attributes, rng: random.Random) -> Tuple[str, Attributes]:
    attribute = rng.choice(ATTRIBUTES)
    value = rng.choice([v for v in _VALUES[attribute] if v != getattr(attrs, attribute)])
    return modification(attribute, value, rng), attrs.replace(attribute, value)


class ShapesDataset(Dataset):
    """``count`` random renderings (or, with ``count=None``, one per attribute combination: 192), each with
    five captions. Item ``i`` is ``(image [3, 32, 32], captions (5 strings), label)`` where ``label`` is the
    attribute combination's id (images with equal labels match the same captions)."""

    captions_per_image = 5

    def __init__(self, count: Optional[int] = None, seed: int = 0) -> None:
        rng = random.Random(seed)
        combos = all_attributes()
        self.attributes = combos if count is None else [rng.choice(combos) for _ in range(count)]
        self.images = torch.stack([render(a, rng) for a in self.attributes]) if self.attributes else torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE)
        self.captions = [[caption(a, rng, t) for t in rng.sample(range(len(_TEMPLATES)), self.captions_per_image)] for a in self.attributes]
        self.labels = torch.tensor([a.index for a in self.attributes], dtype=torch.long)
        #: label -> the rows that show it, in row order (composed triples look targets up here)
        self.rows_by_label: Dict[int, List[int]] = {}
        for i, a in enumerate(self.attributes):
            self.rows_by_label.setdefault(a.index, []).append(i)

    def __len__(self) -> int:
        return len(self.attributes)

    def __getitem__(self, i: int):
        return self.images[i], self.captions[i], int(self.labels[i])


class ComposedQueries:
    """Composed-retrieval triples over a ``ShapesDataset`` with one image per combination: for each image,
    ``per_image`` modifications; ``targets[j]`` is the index of the image the j-th query should find."""

    def __init__(self, gallery: ShapesDataset, per_image: int = 4, seed: int = 1) -> None:
        by_label = {label: rows[-1] for label, rows in gallery.rows_by_label.items()}
        rng = random.Random(seed)
        self.references: List[int] = []
        self.texts: List[str] = []
        self.targets: List[int] = []
        for i, attrs in enumerate(gallery.attributes):
            for _ in range(per_image):
                text, target = random_modification(attrs, rng)
                if target.index in by_label:
                    self.references.append(i)
                    self.texts.append(text)
                    self.targets.append(by_label[target.index])

    def __len__(self) -> int:
        return len(self.texts)


def composed_triples(pool: ShapesDataset, batch: int, rng: random.Random) -> Tuple[Tensor, List[str], Tensor, Tensor]:
    """(reference image, modification text, target image, target label) triples drawn from ``pool``: the
    target is another rendering in the pool with the modified attributes (any, if several)."""
    by_label = pool.rows_by_label
    refs, texts, targets, labels = [], [], [], []
    while len(refs) < batch:
        i = rng.randrange(len(pool))
        text, target = random_modification(pool.attributes[i], rng)
        if target.index not in by_label:
            continue
        refs.append(i)
        texts.append(text)
        targets.append(rng.choice(by_label[target.index]))
        labels.append(target.index)
    return pool.images[refs], texts, pool.images[targets], torch.tensor(labels)
