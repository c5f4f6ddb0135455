"""The built-in Shapes data and the CSV loader for users' own (image, caption) pairs."""
import random
import re

import pytest
import torch

from xmodal import data as D
from xmodal.demo import shapes as S


def test_shapes_is_deterministic():
    a, b = S.ShapesDataset(20, seed=3), S.ShapesDataset(20, seed=3)
    assert torch.equal(a.images, b.images) and a.captions == b.captions and torch.equal(a.labels, b.labels)
    c = S.ShapesDataset(20, seed=4)
    assert not torch.equal(a.images, c.images)


def test_gallery_has_every_combination_once():
    g = S.ShapesDataset(None, seed=0)
    assert len(g) == 4 * 6 * 2 * 4 == 192
    assert sorted(g.labels.tolist()) == list(range(192))
    assert g.images.shape == (192, 3, 32, 32) and 0 <= g.images.min() and g.images.max() <= 1
    assert all(len(c) == 5 and len(set(c)) == 5 for c in g.captions)


def test_rendering_shows_the_attributes():
    rng = random.Random(0)
    for attrs in S.all_attributes():
        image = S.render(attrs, rng)
        colour = torch.tensor(S.COLOURS[attrs.colour])
        # pixels close to the shape's colour (up to the shade jitter) lie in the stated quadrant
        close = ((image - colour[:, None, None] * (image.amax(0, keepdim=True) / colour.max())).abs().amax(0) < 0.12)
        close &= image.amax(0) > 0.5
        ys, xs = close.nonzero(as_tuple=True)
        assert len(ys) >= 9, attrs
        top, left = ys.float().mean() < 16, xs.float().mean() < 16
        assert attrs.position == f"{'top' if top else 'bottom'} {'left' if left else 'right'}", attrs
        assert (len(ys) > 60) == (attrs.size == "large"), (attrs, len(ys))


def test_captions_mention_the_attributes():
    g = S.ShapesDataset(None, seed=1)
    for attrs, caps in zip(g.attributes, g.captions):
        for c in caps:
            assert attrs.colour in c
            assert any(w in c for w in S._KIND_WORDS[attrs.kind])
            assert any(w in c for w in S._SIZE_WORDS[attrs.size])


def test_vocabulary_words_cover_the_built_in_texts():
    words = S.vocabulary_words()
    # the default model's vocabulary: a change here changes the weights build_model makes for a seed
    assert words == [
        "a", "an", "at", "big", "blue", "bottom", "box", "but", "change", "circle", "colour", "coloured", "corner",
        "cross", "cyan", "disc", "green", "has", "image", "in", "instead", "into", "is", "it", "kind", "large", "left",
        "little", "lower", "make", "move", "of", "paint", "placed", "plus", "position", "purple", "put", "red",
        "right", "round", "same", "shape", "sign", "size", "small", "square", "that", "the", "there", "tiny", "to",
        "top", "triangle", "turn", "upper", "yellow",
    ]
    g = S.ShapesDataset(None, seed=4)
    texts = [c for caps in g.captions for c in caps] + S.ComposedQueries(g, per_image=8, seed=5).texts
    used = {w for t in texts for w in re.findall(r"[a-z0-9]+", t.lower())}
    assert used <= set(words)
    assert set(words) - used == {"kind", "position"}


def test_composed_queries_change_one_attribute():
    g = S.ShapesDataset(None, seed=1)
    q = S.ComposedQueries(g, per_image=3, seed=2)
    assert len(q) == 3 * 192
    for ref, target in zip(q.references, q.targets):
        a, b = g.attributes[ref], g.attributes[target]
        assert sum(getattr(a, k) != getattr(b, k) for k in S.ATTRIBUTES) == 1


def test_composed_triples_from_a_pool():
    pool = S.ShapesDataset(500, seed=0)
    refs, texts, targets, labels = S.composed_triples(pool, 16, random.Random(0))
    assert refs.shape == targets.shape == (16, 3, 32, 32) and len(texts) == 16 and labels.shape == (16,)


def _write_png(path, colour=(255, 0, 0), size=(40, 30)):
    from PIL import Image

    Image.new("RGB", size, colour).save(path)


def test_csv_loader(tmp_path):
    (tmp_path / "img").mkdir()
    _write_png(tmp_path / "img" / "a.png")
    _write_png(tmp_path / "img" / "b.png", (0, 0, 255))
    (tmp_path / "data.csv").write_text('image,caption\nimg/a.png,a red picture\nimg/b.png,"blue, all blue"\n')
    ds = D.ImageCaptionCSV(str(tmp_path / "data.csv"))
    assert len(ds) == 2
    image, text = ds[1]
    assert image.shape == (3, 32, 32) and text == "blue, all blue"
    assert torch.allclose(image[:, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=D.collate_captions)
    images, texts = next(iter(loader))
    assert images.shape == (2, 3, 32, 32) and texts == ["a red picture", "blue, all blue"]


def test_csv_loader_labels(tmp_path):
    for name, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255)), ("c", (0, 255, 0))):
        _write_png(tmp_path / f"{name}.png", colour)
    (tmp_path / "data.csv").write_text(
        "image,caption,label\na.png,a red one, warm \nb.png,a blue one,cold\n./c.png,green,warm\na.png,red again,warm\n"
    )
    ds = D.ImageCaptionCSV(str(tmp_path / "data.csv"))
    assert ds.labels.dtype == torch.long and ds.labels.tolist() == [0, 1, 0, 0]
    assert ds.label_names == ["warm", "cold"]  # ids in order of first appearance, names stripped
    assert ds.captions == ["a red one", "a blue one", "green", "red again"]
    assert ds.image_paths == [str(tmp_path / n) for n in ("a.png", "b.png", "c.png", "a.png")]
    assert ds.rows[2] == (str(tmp_path / "c.png"), "green")
    # items are what they were without labels: (image, caption)
    item = ds[1]
    assert len(item) == 2 and item[1] == "a blue one" and torch.allclose(item[0][:, 0, 0], torch.tensor([0.0, 0.0, 1.0]))

    (tmp_path / "plain.csv").write_text("image,caption\na.png,a red one\n")
    plain = D.ImageCaptionCSV(str(tmp_path / "plain.csv"))
    assert plain.labels is None and plain.label_names is None and plain.captions == ["a red one"]


@pytest.mark.parametrize(
    "content,match",
    [
        ("image,caption\nimg/missing.png,hello\n", r"line 2: image file 'img/missing.png' not found"),
        ("image,caption\nimg/a.png,   \n", r"line 2: empty caption for image 'img/a.png'"),
        ("path,text\nimg/a.png,hello\n", r"the header must name the columns 'image' and 'caption'"),
        ("image,caption\n", "no rows"),
        ("image,caption,label\nimg/a.png,hello, \n", r"line 2: empty label for image 'img/a.png'"),
        ("image,caption,label\nimg/a.png,hello\n", r"line 2: empty label for image 'img/a.png'"),
    ],
)
def test_csv_loader_errors(tmp_path, content, match):
    (tmp_path / "img").mkdir()
    _write_png(tmp_path / "img" / "a.png")
    (tmp_path / "data.csv").write_text(content)
    with pytest.raises(ValueError, match=match):
        D.ImageCaptionCSV(str(tmp_path / "data.csv"))


def test_csv_loader_unreadable_image(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    (tmp_path / "data.csv").write_text("image,caption\nbroken.png,something\n")
    ds = D.ImageCaptionCSV(str(tmp_path / "data.csv"))
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        ds[0]


def test_csv_loader_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        D.ImageCaptionCSV(str(tmp_path / "nope.csv"))
