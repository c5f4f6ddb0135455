"""Data for cross-modal retrieval: a built-in data set generated on the fly, and a loader for your own.

**Shapes** (built in, no download): 32 x 32 RGB images of one shape that varies in kind (4), colour (6),
size (2) and position (4 quadrants) -- 192 combinations -- rendered with jitter in position, size, shade
and background noise, each with five captions written from templates and synonyms ("a big red disc in the
upper left", ...). Composed queries pair a reference image with a modification ("make it blue") and the
target image that has the modified attributes. Everything is a deterministic function of a seed.

**Your own data**: :class:`ImageCaptionCSV` reads a ``data.csv`` of ``image,caption[,label]`` rows (image
paths relative to the CSV's folder) into a torch ``Dataset``.
"""
from __future__ import annotations

import csv
import os
import random
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

IMAGE_SIZE = 32
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


class ImageCaptionCSV(Dataset):
    """Your own ``(image, caption)`` pairs from a CSV file with a header row ``image,caption`` or
    ``image,caption,label``.

    Image paths are relative to the CSV's folder (or absolute). Items are ``(image [3, H, W] float in [0, 1],
    caption)``; images are resized to ``image_size`` (default 32, the built-in encoder's input) unless a
    ``transform`` (PIL image -> tensor) is given. Checks every row up front: a missing file, an empty caption,
    an empty label (when there is a label column) or a missing column raises ``ValueError`` naming the row; an
    unreadable image raises when it is loaded.

    The optional ``label`` column names a class (any string). Pairs with equal labels match each other:
    ``train.train_pairs`` makes them positives (never negatives) and ``evaluation.evaluate_pairs`` counts every
    image of a caption's class as a hit. Attributes, one entry per row:

    - ``captions``: the captions (fit the tokenizer on these: ``Tokenizer.fit(pairs.captions)``);
    - ``image_paths``: the images' full paths;
    - ``labels``: ``[N]`` int64 ids of the labels, numbered in order of first appearance, or ``None``
      without a label column; ``label_names[id]`` is the label as written in the CSV (``None`` without one).
    """

    def __init__(self, csv_path: str, image_size: int = IMAGE_SIZE, transform: Optional[Callable] = None) -> None:
        self.root = os.path.dirname(os.path.abspath(csv_path))
        self.image_size, self.transform = image_size, transform
        if not os.path.isfile(csv_path):
            raise ValueError(f"data file {csv_path!r} does not exist")
        self.image_paths: List[str] = []
        self.captions: List[str] = []
        label_ids: List[int] = []
        ids_by_name: Dict[str, int] = {}
        with open(csv_path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = {"image", "caption"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{csv_path}: the header must name the columns 'image' and 'caption', got {reader.fieldnames}")
            has_labels = "label" in reader.fieldnames
            for line, row in enumerate(reader, start=2):
                path, text = (row["image"] or "").strip(), (row["caption"] or "").strip()
                if not text:
                    raise ValueError(f"{csv_path}, line {line}: empty caption for image {path!r}")
                full = os.path.normpath(path if os.path.isabs(path) else os.path.join(self.root, path))
                if not path or not os.path.isfile(full):
                    raise ValueError(f"{csv_path}, line {line}: image file {path!r} not found (looked for {full})")
                if has_labels:
                    name = (row["label"] or "").strip()
                    if not name:
                        raise ValueError(f"{csv_path}, line {line}: empty label for image {path!r} (the header has a "
                                         f"'label' column, so every row needs one)")
                    label_ids.append(ids_by_name.setdefault(name, len(ids_by_name)))
                self.image_paths.append(full)
                self.captions.append(text)
        if not self.captions:
            raise ValueError(f"{csv_path}: no rows")
        self.labels: Optional[Tensor] = torch.tensor(label_ids, dtype=torch.long) if has_labels else None
        self.label_names: Optional[List[str]] = list(ids_by_name) if has_labels else None

    @property
    def rows(self) -> List[Tuple[str, str]]:
        """``(image path, caption)`` of every row."""
        return list(zip(self.image_paths, self.captions))

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> Tuple[Tensor, str]:
        from PIL import Image, UnidentifiedImageError

        path, text = self.image_paths[i], self.captions[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if self.transform is not None:
                    return self.transform(im), text
                im = im.resize((self.image_size, self.image_size))
                data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read image {path!r}: {e}") from e
        return data.view(self.image_size, self.image_size, 3).permute(2, 0, 1).float() / 255, text


def collate_captions(batch: Sequence) -> Tuple[Tensor, List]:
    """``DataLoader`` collate for (image, caption-or-captions[, ...]) items: stacks images, keeps texts as lists."""
    images = torch.stack([item[0] for item in batch])
    rest = [list(column) for column in zip(*[item[1:] for item in batch])]
    return (images, *rest)


def row_attribute(pairs, name: str):
    """``pairs.<name>``, one entry per row (``labels``, ``image_paths``), or None where it has none. Sees
    through a ``torch.utils.data.Subset`` (what ``random_split`` makes): its rows are some of its data set's.
    Shared by ``evaluation.evaluate_pairs`` and ``train.train_pairs`` (which rows are positives for each other)."""
    if isinstance(pairs, Subset):
        values = row_attribute(pairs.dataset, name)
        if values is None:
            return None
        if isinstance(values, Tensor):
            return values[torch.as_tensor(pairs.indices, dtype=torch.long)]
        return [values[i] for i in pairs.indices]
    return getattr(pairs, name, None)
