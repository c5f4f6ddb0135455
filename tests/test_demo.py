"""The demo's picture: legend, column headers and every query direction, text results drawn as captions."""
import math

import pytest
from PIL import Image

from xmodal import demo
from xmodal.demo import shapes as S
from xmodal.demo.training import build_model


def test_example_rows_cover_every_direction():
    gallery = S.ShapesDataset(None, seed=2)
    model = build_model(0).eval()
    rows = demo.example_rows(model, gallery, S.ComposedQueries(gallery, per_image=1), top=5)
    titles = [r["title"] for r in rows]
    assert {"text -> image", "image -> text", "composed (image + text)"} == set(titles)
    for row in rows:
        assert len(row["results"]) == 5
        texts = [isinstance(result, str) for result, _ in row["results"]]
        assert all(texts) if row["title"] == "image -> text" else not any(texts)
        assert all(isinstance(correct, bool) for _, correct in row["results"])


def test_grid_has_a_header_and_one_band_per_row(tmp_path):
    gallery = S.ShapesDataset(4, seed=0)
    rows = [
        {"title": "text -> image", "text": "a red disc", "results": [(gallery.images[0], True), (gallery.images[1], False)]},
        {"title": "image -> text", "image": gallery.images[2], "results": [("a big blue square on the left", False)] * 2},
    ]
    path = tmp_path / "grid.png"
    demo.write_grid(str(path), rows, cell=64)
    image = Image.open(path)
    assert image.size[1] == 40 + 2 * (64 + 12) + 6  # header, two rows
    # the frames' colours are in the picture: query (blue), correct (green), wrong (red)
    colours = {c for _, c in image.convert("RGB").getcolors(1 << 16)}
    assert {demo.QUERY_FRAME, demo.CORRECT_FRAME, demo.WRONG_FRAME} <= colours
    assert not list(tmp_path.glob("*.tmp-*"))


def test_the_printed_results_say_what_each_number_is():
    gallery = S.ShapesDataset(None, seed=2)
    composed = S.ComposedQueries(gallery, per_image=1)
    results = {f"{d}_R@{r}": 0.5 for d in ("text_to_image", "image_to_text", "composed") for r in (1, 5, 10)}
    text = demo.results_table(results, gallery, composed)
    assert "R@K: the fraction of queries whose right answer is among the first K results" in text
    assert f"{len(composed)} composed queries" in text
    rows = {line.split("  ")[0].strip(): line for line in text.splitlines()
            if line.startswith(("text -> image", "image -> text", "composed "))}
    assert set(rows) == {"text -> image", "image -> text", "composed"}
    # a random ranking's R@10 beside each direction: 10 of 192 images; any of 5 captions among 960
    assert "0.052   the caption's image (of 192 images)" in rows["text -> image"]
    assert f"{demo.chance_recall(10, 5, 960):.3f}   any of the image's captions (of 960 captions)" in rows["image -> text"]
    assert demo.chance_recall(10, 1, 192) == pytest.approx(10 / 192)
    assert demo.chance_recall(10, 5, 960) == pytest.approx(1 - math.prod((955 - i) / (960 - i) for i in range(10)))
    assert "re-ranking" not in text and "mAP" not in text
