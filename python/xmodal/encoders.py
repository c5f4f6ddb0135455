"""Encoders that map images and text into one embedding space, and the two-tower model with composed queries.

The defaults are small enough to train from scratch on two CPU cores in a couple of minutes (the built-in
data set); both towers accept your own backbone instead (a torchvision model with weights you have on disk,
a sentence-transformers model from a local path).
"""
from __future__ import annotations

import math
import re
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
        self.feature_dim = feature_dim
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

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


class TextEncoder(nn.Module):
    """Token ids ``[B, L]`` (0 = padding) -> features ``[B, feature_dim]``: embeddings + learned positions,
    a small transformer encoder, then the mean over the non-padding tokens."""

    def __init__(self, vocab_size: int, feature_dim: int = 256, layers: int = 2, heads: int = 4, max_length: int = 32) -> None:
        super().__init__()
        self.feature_dim = feature_dim
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
