"""The demo's picture of example queries: :func:`example_rows` runs a few text -> image, image -> text and composed
queries; :func:`write_grid` draws them with their top results, framed by whether each is right."""
from __future__ import annotations

from typing import List, Sequence

import torch

from .._atomic import write_atomic
from ..index import FlatIndex
from .shapes import ComposedQueries, ShapesDataset

__all__ = ["QUERY_FRAME", "CORRECT_FRAME", "WRONG_FRAME", "write_grid", "example_rows"]


def _upscale(image: torch.Tensor, size: int) -> torch.Tensor:
    return torch.nn.functional.interpolate(image[None], size=(size, size), mode="nearest")[0]


QUERY_FRAME, CORRECT_FRAME, WRONG_FRAME = (60, 60, 200), (30, 170, 60), (210, 40, 40)


def write_grid(path: str, rows: Sequence[dict], cell: int = 96) -> None:
    """PNG with a legend, column headers (query, rank 1..k) and one row per query: the query (text and/or
    image) then its top results, each result an image or a caption, framed green (correct) or red (wrong)."""
    from PIL import Image, ImageDraw

    text_w, pad, header = 260, 6, 40
    results = max(len(r["results"]) for r in rows)
    width = text_w + (cell + pad) * (results + 1) + pad
    height = header + (cell + 2 * pad) * len(rows) + pad
    canvas = Image.new("RGB", (width, height), (245, 245, 245))
    draw = ImageDraw.Draw(canvas)
    # legend: what each frame colour means
    x = pad
    for colour, label in ((QUERY_FRAME, "query image"), (CORRECT_FRAME, "correct result"), (WRONG_FRAME, "wrong result")):
        draw.rectangle([x, 6, x + 14, 20], outline=colour, width=3)
        draw.text((x + 20, 7), label, fill=(40, 40, 40))
        x += 30 + 7 * len(label)
    # column headers
    draw.text((pad, header - 14), "query", fill=(40, 40, 40))
    draw.text((text_w, header - 14), "query image", fill=(40, 40, 40))
    for r in range(results):
        draw.text((text_w + (cell + pad) * (r + 1), header - 14), f"rank {r + 1}", fill=(40, 40, 40))
    for r, row in enumerate(rows):
        y = header + pad + r * (cell + 2 * pad)
        draw.text((pad, y + 4), row["title"], fill=(40, 40, 40))
        lines = _wrap(row["text"], 38) if row.get("text") else []
        for j, line in enumerate(lines[:5]):
            draw.text((pad, y + 22 + 14 * j), line, fill=(0, 0, 0))
        x = text_w
        if row.get("image") is not None:
            canvas.paste(_to_pil(_upscale(row["image"], cell)), (x, y + pad))
            draw.rectangle([x - 2, y + pad - 2, x + cell + 1, y + pad + cell + 1], outline=QUERY_FRAME, width=2)
        x += cell + pad
        for result, correct in row["results"]:
            if isinstance(result, str):  # a caption (image -> text)
                draw.rectangle([x, y + pad, x + cell - 1, y + pad + cell - 1], fill=(255, 255, 255))
                for j, line in enumerate(_wrap(result, cell // 7)[:6]):
                    draw.text((x + 3, y + pad + 3 + 14 * j), line, fill=(0, 0, 0))
            else:
                canvas.paste(_to_pil(_upscale(result, cell)), (x, y + pad))
            colour = CORRECT_FRAME if correct else WRONG_FRAME
            draw.rectangle([x - 2, y + pad - 2, x + cell + 1, y + pad + cell + 1], outline=colour, width=3)
            x += cell + pad
    write_atomic(path, canvas.save, suffix=".png")


def _to_pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray((image.clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy())


def _wrap(text: str, width: int) -> List[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def example_rows(model, gallery: ShapesDataset, composed: ComposedQueries, top: int = 5) -> List[dict]:
    with torch.no_grad():
        index = FlatIndex(model.image_head.net[-1].out_features, "ip")
        index.add(model.encode_image(gallery.images))
        rows = []
        for i in (0, 37, 101):
            text = gallery.captions[i][0]
            _, ids = index.search(model.encode_text([text]), top)
            rows.append({"title": "text -> image", "text": text,
                         "results": [(gallery.images[j], j == i) for j in ids[0].tolist()]})
        captions = [c for per_image in gallery.captions for c in per_image]
        owner = [i for i, per_image in enumerate(gallery.captions) for _ in per_image]
        caption_index = FlatIndex(model.image_head.net[-1].out_features, "ip")
        caption_index.add(model.encode_text(captions))
        for i in (5, 120):
            _, ids = caption_index.search(model.encode_image(gallery.images[[i]]), top)
            rows.append({"title": "image -> text", "image": gallery.images[i],
                         "results": [(captions[j], owner[j] == i) for j in ids[0].tolist()]})
        for j in (0, 57, 130):
            ref, text, target = composed.references[j], composed.texts[j], composed.targets[j]
            _, ids = index.search(model.encode_composed(gallery.images[[ref]], [text]), top)
            rows.append({"title": "composed (image + text)", "text": text, "image": gallery.images[ref],
                         "results": [(gallery.images[t], t == target) for t in ids[0].tolist()]})
    return rows
