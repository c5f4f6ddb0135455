"""xmodal.train.MultiTaskLoss (learned uncertainty weights and fixed weights) and multi-task training on the
built-in Shapes data (contrastive retrieval + attribute classification)."""
import math

import pytest
import torch

from xmodal.demo import shapes as S
from xmodal.demo.multitask import AttributeHeads, attribute_accuracy, linear_probe, train_multitask
from xmodal.demo.training import TrainConfig, build_model, train
from xmodal.train import MultiTaskLoss


def test_fixed_weights_are_a_weighted_sum():
    loss = MultiTaskLoss(["a", "b", "c"], "fixed", weights={"b": 0.5, "c": 0.0})
    total = loss({"a": torch.tensor(2.0), "b": torch.tensor(4.0), "c": torch.tensor(100.0)})
    assert total.item() == pytest.approx(2.0 + 2.0)
    assert loss.weights() == {"a": 1.0, "b": 0.5, "c": 0.0}
    assert list(loss.parameters()) == []


def test_uncertainty_weighting_formula_and_gradients():
    loss = MultiTaskLoss(["cls", "reg"], kinds={"reg": "regression"})
    with torch.no_grad():
        loss.log_vars.copy_(torch.tensor([0.5, -1.0]))
    a, b = torch.tensor(3.0, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    total = loss({"cls": a, "reg": b})
    expected = math.exp(-0.5) * 3.0 + 0.25 + 0.5 * math.exp(1.0) * 2.0 - 0.5
    assert total.item() == pytest.approx(expected, rel=1e-6)
    total.backward()
    assert a.grad.item() == pytest.approx(math.exp(-0.5))
    assert b.grad.item() == pytest.approx(0.5 * math.exp(1.0))
    # d/ds (exp(-s) L + s/2) = -exp(-s) L + 1/2
    assert loss.log_vars.grad.tolist() == pytest.approx([-math.exp(-0.5) * 3 + 0.5, -0.5 * math.exp(1.0) * 2 + 0.5])
    assert loss.weights() == pytest.approx({"cls": math.exp(-0.5), "reg": 0.5 * math.exp(1.0)})


def test_learned_weights_settle_where_the_paper_says():
    """For fixed task losses L, exp(-s) L + s/2 is smallest at s = log(2 L): the noisier task gets the smaller
    weight 1 / (2 L)."""
    loss = MultiTaskLoss(["small", "large"])
    opt = torch.optim.Adam(loss.parameters(), lr=0.05)
    values = {"small": torch.tensor(0.1), "large": torch.tensor(5.0)}
    for _ in range(2000):
        opt.zero_grad()
        loss(values).backward()
        opt.step()
    assert loss.log_vars.tolist() == pytest.approx([math.log(0.2), math.log(10.0)], abs=1e-2)
    assert loss.weights()["small"] > loss.weights()["large"]


def test_max_weight_caps_a_task_whose_loss_vanishes():
    loss = MultiTaskLoss(["main", "easy"], max_weight=10.0)
    opt = torch.optim.Adam(loss.parameters(), lr=0.1)
    values = {"main": torch.tensor(1.0), "easy": torch.tensor(1e-6)}  # optimum weight 1 / (2e-6) = 5e5
    for _ in range(500):
        opt.zero_grad()
        loss(values).backward()
        opt.step()
    assert loss.weights()["easy"] == pytest.approx(10.0)
    assert loss.weights()["main"] == pytest.approx(0.5, rel=1e-2)
    unbounded = MultiTaskLoss(["easy"])
    with torch.no_grad():
        unbounded.log_vars.fill_(-20.0)
    assert unbounded.weights()["easy"] > 1e8


@pytest.mark.parametrize("args, kwargs, error, message", [
    ((["a", "a"],), {}, ValueError, r"tasks must be distinct"),
    (([],), {}, ValueError, r"tasks must be a non-empty sequence"),
    (("ab",), {}, TypeError, r"tasks must be a sequence of task names, got the str 'ab'"),
    ((["a"], "softmax"), {}, ValueError, r"weighting must be 'uncertainty' or 'fixed', got 'softmax'"),
    ((["a"], "uncertainty"), {"weights": {"a": 2.0}}, ValueError, r"weights are for weighting='fixed'"),
    ((["a"], "fixed"), {"weights": {"b": 2.0}}, ValueError, r"weights names tasks that are not in tasks \['a'\]: \['b'\]"),
    ((["a"], "fixed"), {"weights": {"a": -1.0}}, ValueError, r"weights\['a'\] must be a finite number >= 0, got -1.0"),
    ((["a"],), {"kinds": {"a": "ranking"}}, ValueError, r"kinds\['a'\] must be one of"),
    ((["a"], "fixed"), {"max_weight": 5.0}, ValueError, r"max_weight caps learned weights"),
    ((["a"],), {"max_weight": 0}, ValueError, r"max_weight must be a finite number > 0, got 0"),
])
def test_constructor_errors(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        MultiTaskLoss(*args, **kwargs)


def test_forward_errors():
    loss = MultiTaskLoss(["a", "b"])
    with pytest.raises(ValueError, match=r"missing \['b'\], unexpected \['c'\]"):
        loss({"a": torch.tensor(1.0), "c": torch.tensor(1.0)})
    with pytest.raises(ValueError, match=r"losses\['b'\] must be a scalar tensor, got \(2,\)"):
        loss({"a": torch.tensor(1.0), "b": torch.ones(2)})
    with pytest.raises(TypeError, match=r"losses must be a dict"):
        loss([torch.tensor(1.0)])


TINY = TrainConfig(steps=4, batch_size=16, composed_batch_size=8, warmup_steps=1, train_images=64, seed=3,
                   checkpoint_every=2)


def test_multitask_training_sees_the_batches_train_sees():
    """With the attribute tasks weighted 0, multi-task training is plain training: same batches, same updates."""
    pool = S.ShapesDataset(TINY.train_images, seed=5)
    plain = build_model(0)
    train(plain, TINY, progress=False, pool=pool)
    multi = build_model(0)
    last, heads, losses = train_multitask(multi, TINY, weighting="fixed", weights={"kind": 0.0, "colour": 0.0, "size": 0.0},
                                          progress=False, pool=pool)
    for (name, a), b in zip(plain.state_dict().items(), multi.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name
    assert {"match_loss", "kind_loss", "colour_loss", "size_loss", "retrieval_weight"} <= set(last)


def test_multitask_training_learns_the_attributes(tmp_path):
    pool = S.ShapesDataset(256, seed=5)
    test = S.ShapesDataset(None, seed=7)
    # 60 steps: colour accuracy ~0.5 on both CPU kinds (at 30 it was 0.32 with AVX-512 and 0.27 with AVX2 kernels)
    config = TrainConfig(steps=60, batch_size=32, composed_batch_size=8, warmup_steps=5, train_images=256, seed=1,
                         checkpoint_every=30)
    model = build_model(0)
    last, heads, losses = train_multitask(model, config, progress=False, pool=pool, checkpoint=str(tmp_path / "c.pt"))
    assert set(losses.weights()) == {"retrieval", "kind", "colour", "size"}
    accuracy = attribute_accuracy(model, heads, test)
    assert set(accuracy) == {"kind", "colour", "size"}
    assert accuracy["colour"] > 0.3  # six colours: chance is 1/6
    probe = linear_probe(model, pool, test, steps=50)
    assert all(0.0 <= v <= 1.0 for v in probe.values())
    # the checkpoint holds the heads and task weights too, so a resumed run goes on from them
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    assert any(k.startswith("heads.") for k in state["model"]) and "loss.log_vars" in state["model"]


def test_attribute_heads_errors():
    with pytest.raises(ValueError, match=r"attributes must be a non-empty list of .*got \['shade'\]"):
        AttributeHeads(8, ["shade"])


def test_the_demo_takes_multitask_training_from_the_command_line(monkeypatch):
    from xmodal import cli, demo

    seen = {}
    monkeypatch.setattr(demo, "run", lambda args: seen.setdefault("args", args) and 0)
    assert cli.main(["demo", "--multitask", "--steps", "3"]) == 0
    assert seen["args"].multitask is True and seen["args"].steps == 3 and seen["args"].demo_task is None
    seen.clear()
    cli.main(["demo"])
    assert seen["args"].multitask is False
