"""The demo's test gallery as a collection for ``xmodal serve``: each image's embedding by the trained model,
its picture as media and its attributes and first caption as payload, so that
``xmodal serve <out>/collections --model <out>/model --ui`` opens a search page over it in one command."""
from __future__ import annotations

import os
import shutil
import tempfile

import torch

from ..index import FlatIndex
from ..serve import write_collection
from .shapes import ShapesDataset

__all__ = ["COLLECTION", "write_gallery_collection"]

COLLECTION = "shapes"


@torch.no_grad()
def write_gallery_collection(model, gallery: ShapesDataset, folder: str, name: str = COLLECTION) -> str:
    """Write ``gallery`` (ids 0..n-1) into ``folder`` as collection ``name``, replacing an earlier one of that
    name (the demo's own output); returns the collection's folder."""
    from PIL import Image

    model.eval()
    embeddings = model.encode_image(gallery.images).float()
    index = FlatIndex(embeddings.shape[1], "cosine")
    index.add(embeddings, ids=torch.arange(len(gallery)))
    payloads = {}
    with tempfile.TemporaryDirectory() as media:
        for i, attrs in enumerate(gallery.attributes):
            file = f"{i:03d}.png"
            pixels = gallery.images[i].mul(255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
            Image.fromarray(pixels).save(os.path.join(media, file))
            payloads[i] = {"image": file, "caption": gallery.captions[i][0], "kind": attrs.kind,
                           "colour": attrs.colour, "size": attrs.size, "position": attrs.position}
        shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
        write_collection(folder, name, index, payloads, media=media)
    return os.path.join(folder, name)
