"""Training on and evaluating your own (image, caption[, label]) pairs: labels as positives, checkpoints and
exact resume, and retrieval metrics checked against a brute-force computation."""
import os

import numpy as np
import pytest
import torch

from xmodal import data as D
from xmodal import train as T
from xmodal.demo import shapes as S
from xmodal.encoders import CrossModalModel, ImageEncoder, TextEncoder, Tokenizer


def _write_csv(folder, count=12, labels=True, duplicates=(), seed=9):
    """A data.csv of ``count`` rendered Shapes images with one caption each (label: the shape's kind), plus
    for each row index in ``duplicates`` a second row with the same image file and another caption.
    Returns the rows as written: (file, caption, label)."""
    from PIL import Image

    shapes = S.ShapesDataset(count, seed=seed)
    rows = []
    for i, (image, captions, _) in enumerate(shapes):
        Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(folder / f"{i}.png")
        rows.append((f"{i}.png", f"{i} {captions[0]}", shapes.attributes[i].kind))
    for i in duplicates:
        rows.append((rows[i][0], f"{i} again {shapes.captions[i][1]}", rows[i][2]))
    header = "image,caption,label" if labels else "image,caption"
    lines = [f'{f},"{c}",{k}' if labels else f'{f},"{c}"' for f, c, k in rows]
    (folder / "data.csv").write_text("\n".join([header] + lines) + "\n")
    return rows


def _tiny_model(pairs, seed=0, dropout=False):
    """A small model; with ``dropout``, a backbone that draws random numbers in training."""
    tokenizer = Tokenizer.fit(pairs.captions)
    torch.manual_seed(seed)
    backbone = None
    if dropout:
        backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.2), torch.nn.Linear(3 * 32 * 32, 16))
    text = TextEncoder(len(tokenizer), 16, layers=1, heads=2)
    return CrossModalModel(ImageEncoder(16, width=8, backbone=backbone), text, tokenizer, embed_dim=8, fusion_dim=8,
                           fusion_factor=2)


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _spy_on_batches(monkeypatch, model):
    """Records, for every training step, the captions of the batch and the labels the loss got."""
    calls = []
    encode_text, loss = model.encode_text, T.contrastive_loss

    def recording_encode_text(texts):
        calls.append({"texts": list(texts)})
        return encode_text(texts)

    def recording_loss(a, b, logit_scale, labels=None):
        calls[-1]["labels"] = None if labels is None else labels.tolist()
        return loss(a, b, logit_scale, labels)

    monkeypatch.setattr(model, "encode_text", recording_encode_text)
    monkeypatch.setattr(T, "contrastive_loss", recording_loss)
    return calls


def test_train_pairs_makes_same_label_pairs_positives(tmp_path, monkeypatch):
    rows = _write_csv(tmp_path, count=12)
    pairs = D.ImageCaptionCSV(str(tmp_path / "data.csv"))
    model = _tiny_model(pairs)
    calls = _spy_on_batches(monkeypatch, model)
    T.train_pairs(model, pairs, epochs=2, batch_size=6, progress=False)
    assert len(calls) == 4
    label_of = {caption: pairs.label_names.index(kind) for _, caption, kind in rows}
    for call in calls:
        # the loss's labels are the batch rows' labels, row for row: equal labels are positives
        assert call["labels"] == [label_of[t] for t in call["texts"]]
    # 12 rows of 4 kinds in batches of 6: some batch holds two pairs of one label (which plain InfoNCE would
    # have pushed apart)
    assert any(len(set(call["labels"])) < len(call["labels"]) for call in calls)

    # a random_split keeps the labels of its rows
    calls.clear()
    subset, _ = torch.utils.data.random_split(pairs, [8, 4], generator=torch.Generator().manual_seed(0))
    T.train_pairs(model, subset, epochs=1, batch_size=4, progress=False)
    assert len(calls) == 2
    assert all(call["labels"] == [label_of[t] for t in call["texts"]] for call in calls)


def test_train_pairs_without_labels(tmp_path, monkeypatch):
    _write_csv(tmp_path, count=8, labels=False)
    pairs = D.ImageCaptionCSV(str(tmp_path / "data.csv"))
    model = _tiny_model(pairs)
    calls = _spy_on_batches(monkeypatch, model)
    T.train_pairs(model, pairs, epochs=1, batch_size=4, progress=False)
    assert [call["labels"] for call in calls] == [None, None]  # one pair per image: plain InfoNCE, as before

    # two captions of one image file are positives for each other, not negatives
    _write_csv(tmp_path, count=3, labels=False, duplicates=(0,))
    pairs = D.ImageCaptionCSV(str(tmp_path / "data.csv"))
    calls.clear()
    T.train_pairs(model, pairs, epochs=1, batch_size=4, progress=False)
    image_of = dict(zip(pairs.captions, [0, 1, 2, 0]))
    assert len(calls) == 1
    assert calls[0]["labels"] == [image_of[t] for t in calls[0]["texts"]]


def test_train_pairs_resumes_exactly(tmp_path):
    _write_csv(tmp_path, count=12)
    pairs = D.ImageCaptionCSV(str(tmp_path / "data.csv"))
    settings = dict(epochs=3, batch_size=4, lr=3e-3, seed=2, progress=False)  # 3 steps per epoch
    # with dropout, so that the random state must be restored too
    a, b = _tiny_model(pairs, dropout=True), _tiny_model(pairs, dropout=True)
    history = T.train_pairs(a, pairs, **settings)
    assert len(history) == 3
    assert T.train_pairs(b, pairs, **settings) == history and torch.equal(_params(a), _params(b))  # deterministic

    # stop in the middle of epoch 2 (after step 5; the last checkpoint holds step 4), resume: as if never stopped
    ckpt = str(tmp_path / "ckpt.pt")

    def interrupt(step, losses):
        assert set(losses) == {"loss"}
        if step == 5:
            raise KeyboardInterrupt

    c = _tiny_model(pairs, dropout=True)
    with pytest.raises(KeyboardInterrupt):
        T.train_pairs(c, pairs, **settings, checkpoint=ckpt, checkpoint_every=2, on_step=interrupt)
    assert torch.load(ckpt, weights_only=True)["step"] == 4
    d = _tiny_model(pairs, seed=7, dropout=True)  # other initial weights: everything comes from the checkpoint
    assert T.train_pairs(d, pairs, **settings, checkpoint=ckpt, checkpoint_every=2, resume=True) == history
    assert torch.equal(_params(a), _params(d))
    assert not any(".tmp" in name for name in os.listdir(tmp_path))
    assert torch.load(ckpt, weights_only=True)["step"] == 9

    # by default a checkpoint is written after every epoch
    e = _tiny_model(pairs)
    with pytest.raises(KeyboardInterrupt):
        T.train_pairs(e, pairs, **settings, checkpoint=ckpt, on_step=interrupt)
    assert torch.load(ckpt, weights_only=True)["step"] == 3

    # a checkpoint of other settings or data is refused, not silently mixed in
    with pytest.raises(ValueError, match=r"other settings \(batch_size: 4 then, 6 now\)"):
        T.train_pairs(e, pairs, **{**settings, "batch_size": 6}, checkpoint=ckpt, resume=True)
    with pytest.raises(ValueError, match=r"resume=True needs the checkpoint file"):
        T.train_pairs(e, pairs, **settings, resume=True)
    with pytest.raises(ValueError, match=r"the folder '.*no_such_folder' does not exist"):
        T.train_pairs(e, pairs, **settings, checkpoint=str(tmp_path / "no_such_folder" / "ckpt.pt"))


def _brute_force(model, folder, rows, ks):
    """The metrics of evaluate_pairs computed directly: the similarity of every caption and every image
    (images: one per file, read here), full rankings by sorting, relevance from the rows as written."""
    from PIL import Image

    files = list(dict.fromkeys(f for f, _, _ in rows))
    use_labels = rows[0][2] is not None
    images = torch.stack([torch.from_numpy(np.array(Image.open(folder / f).convert("RGB"))).permute(2, 0, 1) / 255
                          for f in files]).float()
    with torch.no_grad():
        sim = model.encode_text([c for _, c, _ in rows]) @ model.encode_image(images).T  # [captions, images]

    def relevant(caption_row, file):
        f, _, label = rows[caption_row]
        if use_labels:
            return any(lab == label for g, _, lab in rows if g == file)
        return f == file

    def scores(ranking, rel):
        out = {f"R@{k}": float(any(rel[r] for r in ranking[:k])) for k in ks}
        for name, cut in ((f"mAP@{max(ks)}", max(ks)), ("mAP", len(ranking))):
            hits, total = 0, 0.0
            for rank, r in enumerate(ranking[:cut], start=1):
                if rel[r]:
                    hits += 1
                    total += hits / rank
            out[name] = total / min(sum(rel), cut)
        return out

    per_direction = {"text_to_image": [], "image_to_text": []}
    for t in range(len(rows)):
        ranking = sim[t].argsort(descending=True).tolist()
        per_direction["text_to_image"].append(scores(ranking, [relevant(t, f) for f in files]))
    for u, f in enumerate(files):
        ranking = sim[:, u].argsort(descending=True).tolist()
        per_direction["image_to_text"].append(scores(ranking, [relevant(t, f) for t in range(len(rows))]))
    return {f"{d}/{name}": sum(s[name] for s in per_query) / len(per_query)
            for d, per_query in per_direction.items() for name in per_query[0]}


@pytest.mark.parametrize("labels", [True, False], ids=["by-label", "by-pair"])
def test_evaluate_pairs_matches_brute_force(tmp_path, labels):
    rows = _write_csv(tmp_path, count=14, labels=labels, duplicates=(2, 5))
    if not labels:
        rows = [(f, c, None) for f, c, _ in rows]
    pairs = D.ImageCaptionCSV(str(tmp_path / "data.csv"))
    model = _tiny_model(pairs)
    T.train_pairs(model, pairs, epochs=2, batch_size=8, progress=False)  # something better than chance
    model.train()
    got = T.evaluate_pairs(model, pairs, ks=(1, 3, 10), batch_size=5)
    assert model.training  # its mode is restored
    model.eval()
    expected = _brute_force(model, tmp_path, rows, (1, 3, 10))
    assert set(got) == set(expected) == {f"{d}/{m}" for d in ("text_to_image", "image_to_text")
                                         for m in ("R@1", "R@3", "R@10", "mAP@10", "mAP")}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert not model.training and T.evaluate_pairs(model, pairs, ks=(1, 3, 10)) == got
    # 14 images, 16 captions: R@20 is capped at all of them, so every query finds something
    everything = T.evaluate_pairs(model, pairs, ks=(20,))
    assert everything["text_to_image/R@20"] == everything["image_to_text/R@20"] == 1.0
    assert everything["text_to_image/mAP@20"] == pytest.approx(got["text_to_image/mAP"], abs=1e-12)


def test_evaluate_pairs_perfect_and_bad_arguments(tmp_path):
    _write_csv(tmp_path, count=6, labels=False)
    pairs = D.ImageCaptionCSV(str(tmp_path / "data.csv"))

    class Oracle(torch.nn.Module):
        """Row i's image and caption map to the i-th unit vector (captions start with the row number)."""

        def __init__(self):
            super().__init__()
            self.logit_scale = torch.nn.Parameter(torch.zeros(()))

        def encode_image(self, images):
            # the rendered images differ: identify them by their exact pixels
            return torch.eye(8)[[next(i for i in range(6) if torch.equal(im, pairs[i][0])) for im in images]]

        def encode_text(self, texts):
            return torch.eye(8)[[int(t.split()[0]) for t in texts]]

    out = T.evaluate_pairs(Oracle(), pairs)
    assert all(v == 1.0 for v in out.values()), out
    with pytest.raises(ValueError, match="ks must be a non-empty tuple or list of positive ints"):
        T.evaluate_pairs(Oracle(), pairs, ks=(0, 5))
    with pytest.raises(ValueError, match="ks must be"):
        T.evaluate_pairs(Oracle(), pairs, ks=5)


def test_evaluate_pairs_lives_in_evaluation_and_stays_importable_from_train():
    from xmodal import evaluation
    from xmodal.train import evaluate_pairs

    assert evaluate_pairs is evaluation.evaluate_pairs
    assert "evaluate_pairs" in T.__all__ and "evaluate_pairs" in evaluation.__all__
    # the demo's Shapes evaluation moved to xmodal.demo.evaluation; the old names warn and still work
    from xmodal.demo import evaluation as demo_evaluation

    for module in (T, evaluation):
        with pytest.warns(DeprecationWarning, match=r"xmodal\.demo\.evaluation\.evaluate"):
            assert module.evaluate is demo_evaluation.evaluate


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_evaluate_save_and_load_on_the_gpu(tmp_path):
    _write_csv(tmp_path, count=8)
    pairs = D.ImageCaptionCSV(str(tmp_path / "data.csv"))
    model = _tiny_model(pairs).cuda()
    history = T.train_pairs(model, pairs, epochs=2, batch_size=4, progress=False)
    assert len(history) == 2 and all(h == h for h in history)
    out = T.evaluate_pairs(model, pairs)
    assert all(0 <= v <= 1 for v in out.values())
    model.save(str(tmp_path / "model"))
    loaded = CrossModalModel.load(str(tmp_path / "model"), device="cuda")
    assert loaded.logit_scale.device.type == "cuda"
    images = torch.stack([pairs[i][0] for i in range(4)]).cuda()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), loaded.encode_image(images))
        torch.testing.assert_close(model.encode_text(pairs.captions), loaded.encode_text(pairs.captions))
