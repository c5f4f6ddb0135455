"""The demo's picture: legend, column headers and every query direction, text results drawn as captions."""
from PIL import Image

from xmodal import data as D
from xmodal import demo
from xmodal.train import build_model


def test_example_rows_cover_every_direction():
    gallery = D.ShapesDataset(None, seed=2)
    model = build_model(0).eval()
    rows = demo.example_rows(model, gallery, D.ComposedQueries(gallery, per_image=1), top=5)
    titles = [r["title"] for r in rows]
    assert {"text -> image", "image -> text", "composed (image + text)"} == set(titles)
    for row in rows:
        assert len(row["results"]) == 5
        texts = [isinstance(result, str) for result, _ in row["results"]]
        assert all(texts) if row["title"] == "image -> text" else not any(texts)
        assert all(isinstance(correct, bool) for _, correct in row["results"])


def test_grid_has_a_header_and_one_band_per_row(tmp_path):
    gallery = D.ShapesDataset(4, seed=0)
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
