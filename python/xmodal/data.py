"""Your own data for cross-modal retrieval: :class:`ImageCaptionCSV` reads a ``data.csv`` of
``image,caption[,label]`` rows (image paths relative to the CSV's folder) into a torch ``Dataset``;
:func:`collate_captions` batches such items for a ``DataLoader``.

The demo's built-in Shapes data lives in :mod:`xmodal.demo.shapes` (its names still resolve here, with a
``DeprecationWarning``, for one release).
"""
from __future__ import annotations

import csv
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from . import _deprecated

#: the side of the images the default encoder reads (``CrossModalModel.default``), and ``ImageCaptionCSV``'s default
IMAGE_SIZE = 32

__all__ = ["IMAGE_SIZE", "ImageCaptionCSV", "collate_captions", "row_attribute"]

# the Shapes names that moved to xmodal.demo.shapes: resolved lazily (and with a warning) by xmodal._deprecated
__getattr__ = _deprecated.module_getattr(__name__)
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
