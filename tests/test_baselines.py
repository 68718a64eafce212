"""The reference points (init, pixels) and identical starts across strategies."""
import numpy as np
import pytest
import torch

from attmask.data.prepare import PrepareArgs, prepare_data
from attmask.data.shards import load_dataset
from attmask.data.stream import EvalStream, make_loader, train_batches
from attmask.data.transforms import EvalTransform
from attmask.engine import Engine
from attmask.eval.baselines import baseline_id, init_backbone
from attmask.eval.features import extract_features
from attmask.eval.suite import EvalOptions, Evaluator
from conftest import tiny_config


def test_init_features_equal_the_step0_teacher(synthetic_dir, tmp_path):
    cfg = tiny_config("train.seed=3")
    teacher = Engine(cfg, steps_per_epoch=2).teacher.backbone
    ev = Evaluator.for_baseline("init", cfg, synthetic_dir, cache_dir=tmp_path / "c",
                                options=EvalOptions(suite=["knn"], knn_ks=(20,)))
    stream = EvalStream(load_dataset(synthetic_dir), "test", EvalTransform(32), 16)
    expected = extract_features(teacher, make_loader(stream, 0)).features
    assert torch.equal(ev.features("test", 1).features, expected)
    # another seed is another network, and its baseline has another identity
    other = init_backbone(tiny_config("train.seed=4"))
    assert not torch.equal(other.pos_embed, teacher.pos_embed)
    assert baseline_id("init", cfg) != baseline_id("init", tiny_config("train.seed=4"))
    # the masking strategy is not part of the init network
    assert baseline_id("init", cfg) == baseline_id("init", tiny_config(
        "train.seed=3", "masking.strategy=random"))


def test_two_strategies_same_seed_start_identically(synthetic_dir):
    dataset = load_dataset(synthetic_dir)
    firsts, states = [], []
    for strategy in ("random", "attmask_high"):
        for workers in (0, 1):
            cfg = tiny_config("train.seed=5", f"masking.strategy={strategy}",
                              f"data.num_workers={workers}")
            engine = Engine(cfg, steps_per_epoch=2)
            states.append({f"{net}.{k}": v.clone() for net in ("student", "teacher")
                           for k, v in getattr(engine, net).state_dict().items()})
            batch = next(iter(train_batches(dataset, cfg, epoch=0, steps=2)))
            firsts.append((workers, batch))
    for state in states[1:]:
        assert state.keys() == states[0].keys()
        assert all(torch.equal(state[k], states[0][k]) for k in state)
    by_workers = {0: [], 1: []}
    for workers, batch in firsts:
        by_workers[workers].append(batch)
    for (a, b) in by_workers.values():
        assert a["key"] == b["key"]  # same samples in the same order
        assert torch.equal(a["global"], b["global"]) and torch.equal(a["local"], b["local"])
    # and a different seed does change both
    other = Engine(tiny_config("train.seed=6"), steps_per_epoch=2)
    assert not torch.equal(other.student.backbone.pos_embed,
                           states[0]["student.backbone.pos_embed"])


@pytest.fixture(scope="module")
def colour_dir(tmp_path_factory):
    """Four classes, each a noisy flat colour: separable in pixel space."""
    src = tmp_path_factory.mktemp("colours-src")
    rng = np.random.default_rng(0)
    colours = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220], [220, 220, 30]])
    for split, n in (("train", 80), ("test", 40)):
        labels = np.arange(n) % 4
        images = colours[labels][:, None, None, :] + rng.integers(-20, 20, (n, 32, 32, 3))
        np.savez(src / f"{split}.npz", images=images.clip(0, 255).astype(np.uint8), labels=labels)
    out = tmp_path_factory.mktemp("colours")
    prepare_data(PrepareArgs(source="npz", from_path=str(src), out=str(out), val_fraction=0))
    return out


def test_pixels_knn_on_a_separable_set_is_perfect(colour_dir, tmp_path):
    opts = EvalOptions(suite=["knn", "linear"], knn_ks=(20,), probe_epochs=20)
    ev = Evaluator.for_baseline("pixels", tiny_config(), colour_dir, cache_dir=tmp_path / "c",
                                options=opts)
    assert ev.knn()["k20"]["top1"] == 1.0
    linear = ev.linear()[0]
    assert linear["top1"] == 1.0 and linear["solver"] == "lbfgs" and linear["converged"]
    train = ev.features("train", 4)
    assert train.features.shape == (80, 3 * 32 * 32)  # one "block": the pixels themselves
    assert train.features.mean(0).abs().max() < 1e-4  # centred on the training mean
    assert "skipped" in ev.attention() or ev.backbone is None


def test_the_pixel_probe_is_solved_to_convergence_where_sgd_stops_short():
    """Raw pixels: thousands of small, unequally scaled dimensions, on which DINO's SGD
    schedule stops far from the optimum (on CIFAR-10 its best epoch was its last in every
    record). The L-BFGS probe stops on its tolerance and does much better."""
    from attmask.eval.linear import accuracy, train_probe, train_probe_lbfgs

    g = torch.Generator().manual_seed(0)
    weights = torch.randn(10, 3072, generator=g)
    scale = 0.5 + torch.rand(3072, generator=g)  # pixel channels: unequal scales

    def draw(n):
        z = torch.randn(n, 3072, generator=g)
        return 0.05 * scale * z, (z @ weights.T + 20 * torch.randn(n, 10, generator=g)).argmax(1)

    (x, y), (xt, yt) = draw(3000), draw(1000)
    sgd = train_probe(x, y, 10, epochs=30, lr=0.01)
    solved = train_probe_lbfgs(x, y, 10)
    assert solved.converged and solved.solver == "lbfgs" and solved.l2 > 0
    assert accuracy(solved.model, xt, yt) > accuracy(sgd.model, xt, yt) + 0.05
