"""Encoders that map images and text into one embedding space, and the two-tower model with composed queries.

The defaults are small enough to train from scratch on two CPU cores in a couple of minutes (the built-in
data set); both towers accept your own backbone instead (a torchvision model with weights you have on disk,
a sentence-transformers model from a local path).
"""
from __future__ import annotations

import json
import math
import os
import re
import uuid
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._atomic import write_atomic
from .nn import FactorizedBilinearPooling

__all__ = ["Tokenizer", "ImageEncoder", "TextEncoder", "SentenceTransformerEncoder", "ProjectionHead", "CrossModalModel"]


class Tokenizer:
    """Lower-cased word-level tokenizer with a vocabulary fitted on your texts (deterministic: sorted words).

    Ids: 0 = padding, 1 = unknown word. ``encode`` returns ``[B, L]`` ids padded with 0 (``L`` = the longest
    text, capped at ``max_length``).
    """

    PAD, UNK = 0, 1

    def __init__(self, vocab: Sequence[str] = (), max_length: int = 32) -> None:
        self.words = list(vocab)
        self.index = {w: i + 2 for i, w in enumerate(self.words)}
        self.max_length = max_length

    @staticmethod
    def split(text: str) -> List[str]:
        return re.findall(r"[a-z0-9]+", text.lower())

    @classmethod
    def fit(cls, texts: Iterable[str], max_length: int = 32) -> "Tokenizer":
        return cls(sorted({w for t in texts for w in cls.split(t)}), max_length)

    def __len__(self) -> int:
        return len(self.words) + 2

    def encode(self, texts: Sequence[str]) -> Tensor:
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts, got a single str")
        ids = [[self.index.get(w, self.UNK) for w in self.split(t)][: self.max_length] or [self.UNK] for t in texts]
        out = torch.zeros(len(ids), max((len(i) for i in ids), default=1), dtype=torch.long)
        for row, i in enumerate(ids):
            out[row, : len(i)] = torch.tensor(i)
        return out

    def state_dict(self) -> Dict:
        return {"words": self.words, "max_length": self.max_length}

    @classmethod
    def from_state_dict(cls, state: Dict) -> "Tokenizer":
        return cls(state["words"], state["max_length"])


class ImageEncoder(nn.Module):
    """Images ``[B, 3, H, W]`` -> features ``[B, feature_dim]``.

    Default: a small convolutional network for 32 x 32 inputs that keeps a coarse 4 x 4 spatial map (so
    *where* things are survives) before a linear layer. Or pass any ``backbone`` module that maps images to
    ``[B, feature_dim]`` (e.g. a torchvision ResNet with its ``fc`` replaced by ``nn.Identity()`` and weights
    loaded from disk) together with its ``feature_dim``.
    """

    def __init__(self, feature_dim: int = 256, backbone: Optional[nn.Module] = None, width: int = 32) -> None:
        super().__init__()
        self.feature_dim, self.width = feature_dim, width
        self.has_backbone = backbone is not None  # a user's module: CrossModalModel.save cannot rebuild it
        if backbone is not None:
            self.net = backbone
            return

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.net = nn.Sequential(
            block(3, width, 2),  # 16 x 16
            block(width, width * 2, 2),  # 8 x 8
            block(width * 2, width * 2, 2),  # 4 x 4
            nn.Flatten(),
            nn.Linear(width * 2 * 16, feature_dim),
            nn.ReLU(inplace=True),
        )

    #: image sides the built-in network takes: three stride-2 convolutions must leave the 4 x 4 map its linear
    #: layer reads (it is made for 32 x 32)
    SIDES = range(25, 33)

    def forward(self, images: Tensor) -> Tensor:
        if not self.has_backbone:  # a backbone checks its own input
            self.check_images(images)
        return self.net(images)

    def check_images(self, images: Tensor, name: str = "images") -> None:
        """ValueError naming ``name``, the shape the built-in network takes and the one given, before the
        network would fail deep inside with a matrix-shape error."""
        if not isinstance(images, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, 3, 32, 32], got {type(images).__name__}")
        shape = list(images.shape)
        if images.dim() != 4 or shape[1] != 3 or shape[2] not in self.SIDES or shape[3] not in self.SIDES:
            hint = ""
            if images.dim() == 3:
                hint = " (one image: add the batch dimension, images[None])"
            elif images.dim() == 4 and shape[1] != 3:
                hint = " (3 colour channels: convert grey-scale or RGBA images to RGB)"
            elif images.dim() == 4:
                hint = " (resize them, e.g. data.ImageCaptionCSV(..., image_size=32))"
            raise ValueError(f"{name} must be [B, 3, H, W] with H and W from {self.SIDES[0]} to {self.SIDES[-1]} "
                             f"for the built-in ImageEncoder (made for 32 x 32), got shape {shape}{hint}")
        if not images.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor (pixel values in [0, 1]), got {images.dtype}")


class TextEncoder(nn.Module):
    """Token ids ``[B, L]`` (0 = padding) -> features ``[B, feature_dim]``: embeddings + learned positions,
    a small transformer encoder, then the mean over the non-padding tokens."""

    def __init__(self, vocab_size: int, feature_dim: int = 256, layers: int = 2, heads: int = 4, max_length: int = 32) -> None:
        super().__init__()
        self.vocab_size, self.feature_dim, self.max_length = vocab_size, feature_dim, max_length
        self.layers, self.heads = layers, heads
        self.embed = nn.Embedding(vocab_size, feature_dim, padding_idx=0)
        self.position = nn.Parameter(torch.randn(max_length, feature_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(feature_dim, heads, feature_dim * 2, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(feature_dim)

    def forward(self, ids: Tensor) -> Tensor:
        pad = ids == 0
        h = self.embed(ids) + self.position[: ids.shape[1]]
        h = self.norm(self.encoder(h, src_key_padding_mask=pad))
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return (h * keep).sum(1) / keep.sum(1).clamp(min=1)


class SentenceTransformerEncoder(nn.Module):
    """Adapter for a sentence-transformers model loaded from a local path (no download): texts -> features.

    The model is frozen (its embeddings are features; the projection head on top is what trains). Needs the
    ``sentence-transformers`` package.
    """

    def __init__(self, path: str, device: Optional[str] = None) -> None:
        super().__init__()
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:  # pragma: no cover - optional dependency
            raise ImportError("SentenceTransformerEncoder needs the sentence-transformers package") from e
        try:
            self.model = SentenceTransformer(path, device=device, local_files_only=True)
        except TypeError:  # sentence-transformers < 3 has no local_files_only (a local path loads locally)
            self.model = SentenceTransformer(path, device=device)
        self.model.requires_grad_(False)
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.feature_dim = dimension()

    def forward(self, texts: Sequence[str]) -> Tensor:
        with torch.no_grad():
            features = self.model.encode(list(texts), convert_to_tensor=True)
        # encode() may run under inference_mode; a clone is an ordinary tensor the trainable head can use
        return features.clone()


class ProjectionHead(nn.Module):
    """Features -> unit-length embeddings in the shared space: Linear, GELU, Linear, L2 normalisation."""

    def __init__(self, in_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, embed_dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.net(x), dim=-1)


class CrossModalModel(nn.Module):
    """Two towers (image, text) with projection heads into one ``embed_dim`` space, a learnable temperature,
    and composed queries (image + modification text) fused with factorized bilinear pooling.

    ``encode_image(images)``, ``encode_text(texts)`` and ``encode_composed(images, texts)`` return unit
    vectors; search them with ``xmodal.topk_search`` or a ``FlatIndex`` (cosine / inner product). Texts are
    lists of strings (tokenised by ``tokenizer``) unless the text encoder takes strings itself.
    ``save(folder)`` / ``CrossModalModel.load(folder)`` store the model with its tokenizer (safetensors + JSON).
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        text_encoder: nn.Module,
        tokenizer: Optional[Tokenizer] = None,
        embed_dim: int = 128,
        fusion_dim: int = 256,
        fusion_factor: int = 4,
    ) -> None:
        super().__init__()
        self.image_encoder, self.text_encoder, self.tokenizer = image_encoder, text_encoder, tokenizer
        self.embed_dim, self.fusion_dim, self.fusion_factor = embed_dim, fusion_dim, fusion_factor
        di, dt = image_encoder.feature_dim, text_encoder.feature_dim
        self.image_head = ProjectionHead(di, embed_dim)
        self.text_head = ProjectionHead(dt, embed_dim)
        self.fusion = FactorizedBilinearPooling(di, dt, fusion_dim, factor=fusion_factor)
        # the composed query is the reference's own embedding moved by what the fusion says to change
        self.compose_head = nn.Sequential(nn.Linear(fusion_dim + di + dt, di), nn.GELU(), nn.Linear(di, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @classmethod
    def default(cls, tokenizer: Tokenizer, embed_dim: int = 128) -> "CrossModalModel":
        return cls(
            ImageEncoder(feature_dim=192),
            TextEncoder(len(tokenizer), feature_dim=128, max_length=tokenizer.max_length),
            tokenizer,
            embed_dim,
        )

    #: the files of a saved model, in the folder given to ``save`` / ``load``
    WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
    _FORMAT, _FORMAT_VERSION = "xmodal.CrossModalModel", 1

    def save(self, path: str) -> None:
        """Writes the model to the folder ``path`` (created if missing; its parent folder must exist): the
        weights as ``model.safetensors``, and as ``config.json`` the tokenizer's vocabulary and the settings
        that rebuild the model. :meth:`load` reads it back.

        Built-in towers (an ``ImageEncoder`` without a backbone, a ``TextEncoder``) are rebuilt from the
        config. A custom tower (an ``ImageEncoder`` with a backbone, a ``SentenceTransformerEncoder``, any
        other module) is saved with its weights, but ``load`` needs the module itself again (its code and
        architecture are not in the files): ``CrossModalModel.load(path, image_encoder=ImageEncoder(512,
        backbone=resnet))``.

        Each file is written atomically (a temporary file in the folder, then a rename). Both carry an id of
        the save, so ``load`` refuses a pair left by an interrupted save over an older one.
        """
        from safetensors.torch import save_model

        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise ValueError(f"cannot save the model to {path!r}: the folder {parent!r} does not exist")
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"cannot save the model to {path!r}: it is a file; save takes a folder")
        config_path = os.path.join(path, self.CONFIG_FILE)
        if os.path.exists(config_path):
            try:  # never overwrite a config.json that is not a saved model's
                self._read_config(config_path)
            except ValueError as e:
                raise ValueError(f"cannot save the model to {path!r}: {e}; choose another folder") from e
        os.makedirs(path, exist_ok=True)
        save_id = uuid.uuid4().hex
        config = {
            "format": self._FORMAT,
            "version": self._FORMAT_VERSION,
            "save_id": save_id,
            "model": {"embed_dim": self.embed_dim, "fusion_dim": self.fusion_dim, "fusion_factor": self.fusion_factor},
            "image_encoder": _tower_config(self.image_encoder),
            "text_encoder": _tower_config(self.text_encoder),
            "tokenizer": self.tokenizer.state_dict() if self.tokenizer is not None else None,
        }
        # save_model (not save_file) copes with tensors that share memory, as tied weights of a custom tower do
        write_atomic(os.path.join(path, self.WEIGHTS_FILE),
                      lambda tmp: save_model(self, tmp, metadata={"xmodal_save_id": save_id}))

        def write_config(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(config, fh, indent=1)

        write_atomic(config_path, write_config)

    @classmethod
    def load(
        cls,
        path: str,
        *,
        image_encoder: Optional[nn.Module] = None,
        text_encoder: Optional[nn.Module] = None,
        device="cpu",
    ) -> "CrossModalModel":
        """The model :meth:`save` wrote to the folder ``path``, on ``device``, in eval mode.

        ``image_encoder`` / ``text_encoder``: the tower modules for a model saved with custom towers (see
        ``save``); the saved weights are loaded into them, so they need the saved architecture.
        """
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_model

        if not os.path.isdir(path):
            what = "it is a file; load takes the folder that save wrote" if os.path.exists(path) else "no such folder"
            raise ValueError(f"cannot load a model from {path!r}: {what}")
        config_path, weights_path = os.path.join(path, cls.CONFIG_FILE), os.path.join(path, cls.WEIGHTS_FILE)
        for f in (config_path, weights_path):
            if not os.path.isfile(f):
                raise ValueError(f"cannot load a model from {path!r}: {os.path.basename(f)} is missing "
                                 f"(CrossModalModel.save writes {cls.WEIGHTS_FILE} and {cls.CONFIG_FILE})")
        config = cls._read_config(config_path)
        try:
            with safe_open(weights_path, "pt") as fh:
                save_id = (fh.metadata() or {}).get("xmodal_save_id")
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{weights_path} is not a safetensors file ({e})") from e
        if save_id != config["save_id"]:
            raise ValueError(f"{weights_path} and {config_path} come from different saves (an interrupted save, or "
                             f"files copied from two models); save the model again")
        tokenizer = Tokenizer.from_state_dict(config["tokenizer"]) if config["tokenizer"] is not None else None
        towers = []
        for name, given in (("image_encoder", image_encoder), ("text_encoder", text_encoder)):
            towers.append(given if given is not None else _build_tower(config[name], name, path))
        model = cls(*towers, tokenizer, **config["model"])
        try:
            load_model(model, weights_path, strict=True)
        except RuntimeError as e:  # missing / unexpected keys or other shapes: a tower of another architecture
            raise ValueError(f"the weights in {weights_path} do not fit the model: {e}") from e
        return model.to(device).eval()

    @classmethod
    def _read_config(cls, config_path: str) -> Dict:
        """The parsed config.json of a saved model; ValueError if the file is not one."""
        try:
            with open(config_path, encoding="utf-8") as fh:
                config = json.load(fh)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{config_path} is not a model config written by CrossModalModel.save ({e})") from e
        if not isinstance(config, dict) or config.get("format") != cls._FORMAT:
            raise ValueError(f"{config_path} was not written by CrossModalModel.save (it lacks \"format\": "
                             f"\"{cls._FORMAT}\")")
        if config.get("version") != cls._FORMAT_VERSION:
            raise ValueError(f"{config_path} has format version {config.get('version')!r}; this xmodal reads "
                             f"version {cls._FORMAT_VERSION}")
        return config

    def _text_features(self, texts) -> Tensor:
        if self.tokenizer is None:
            return self.text_encoder(texts)
        ids = self.tokenizer.encode(texts).to(self.logit_scale.device)
        return self.text_encoder(ids)

    def encode_image(self, images: Tensor) -> Tensor:
        return self.image_head(self.image_encoder(images))

    def encode_text(self, texts) -> Tensor:
        return self.text_head(self._text_features(texts))

    def encode_composed(self, images: Tensor, texts) -> Tensor:
        fi, ft = self.image_encoder(images), self._text_features(texts)
        fused = self.fusion(fi, ft)
        delta = self.compose_head(torch.cat([fused, fi, ft], dim=-1))
        return F.normalize(self.image_head(fi) + delta, dim=-1)


def _tower_config(tower: nn.Module) -> Dict:
    """What rebuilds a tower: the constructor arguments of a built-in one, a description of a custom one."""
    if type(tower) is ImageEncoder and not tower.has_backbone:
        return {"type": "ImageEncoder", "feature_dim": tower.feature_dim, "width": tower.width}
    if type(tower) is TextEncoder:
        return {"type": "TextEncoder", "vocab_size": tower.vocab_size, "feature_dim": tower.feature_dim,
                "layers": tower.layers, "heads": tower.heads, "max_length": tower.max_length}
    name = f"{type(tower).__module__}.{type(tower).__qualname__}"
    if isinstance(tower, ImageEncoder) and tower.has_backbone:
        backbone = type(tower.net)
        name += f" with a backbone {backbone.__module__}.{backbone.__qualname__}"
    return {"type": "custom", "description": name}


def _build_tower(config: Dict, name: str, path: str) -> nn.Module:
    if config["type"] == "ImageEncoder":
        return ImageEncoder(config["feature_dim"], width=config["width"])
    if config["type"] == "TextEncoder":
        return TextEncoder(config["vocab_size"], config["feature_dim"], config["layers"], config["heads"],
                           config["max_length"])
    raise ValueError(f"the model in {path!r} has a custom {name.replace('_', ' ')} ({config['description']}), which "
                     f"load cannot rebuild: pass the module, CrossModalModel.load({path!r}, {name}=...), built as it "
                     f"was when saved (the weights come from the file)")


