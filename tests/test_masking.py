"""Masking semantics (reference sections 2 and 9), one test per rule."""
import math

import pytest
import torch

from attmask import masking
from attmask.masking import make_masker

GRID = (14, 14)
P = GRID[0] * GRID[1]
ALL = masking.available()  # a newly registered strategy is tested by every ALL test
PAPER = ["random", "block", "attmask_high", "attmask_low", "attmask_hint"]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def scores(batch=64, seed=0):
    return torch.rand(batch, P, generator=gen(seed + 100))


def test_registry_lists_the_papers_strategies_and_refuses_a_second_registration():
    assert set(PAPER) <= set(ALL)
    with pytest.raises(ValueError, match="'random' is registered already"):
        masking.register("random")(type("Other", (masking.Masker,), {}))
    assert masking.masker_class("random") is masking.RandomMasker


def test_each_strategy_owns_its_parameters():
    assert masking.parameters("attmask_hint", own=True) == {"show_max": 0.1, "num_hints": None}
    assert set(masking.parameters("block", own=True)) == {"aspect", "min_area", "max_tries"}
    assert masking.parameters("random", own=True) == {}
    shared = {"ratio", "prob", "ratio_per", "batch_size"}
    assert all(shared <= set(masking.parameters(name)) for name in ALL)


@pytest.mark.parametrize("name", ALL)
def test_config_options_reach_the_strategy_and_unknown_ones_are_named(name):
    from attmask.config import load_config
    from attmask.errors import ConfigError

    own = masking.parameters(name, own=True)
    cfg = load_config(overrides={f"masking.options.{name}": own, "masking.strategy": name})
    assert cfg.masking.masker_kwargs() == {"ratio": (0.1, 0.5), "prob": 0.5,
                                           "ratio_per": "image", **own}
    make_masker(name, **cfg.masking.masker_kwargs())
    with pytest.raises(ConfigError, match=f"masking.options.{name}.bogus: {name} has no such"):
        load_config(overrides={f"masking.options.{name}.bogus": 1})


@pytest.mark.parametrize("kwargs, word", [
    ({"ratio": (0.5, 0.1)}, "ratio"), ({"ratio": (-0.1, 0.5)}, "ratio"),
    ({"ratio": (0.1, 1.5)}, "ratio"), ({"prob": 1.2}, "prob"), ({"ratio_per": "crop"}, "ratio_per"),
])
@pytest.mark.parametrize("name", ALL)
def test_out_of_range_values_raise_naming_parameter(name, kwargs, word):
    with pytest.raises(ValueError, match=word):
        make_masker(name, **kwargs)


def test_unknown_name_and_hint_parameters():
    with pytest.raises(ValueError, match="unknown masking strategy 'nope'.*attmask_high"):
        make_masker("nope")
    with pytest.raises(ValueError, match="num_hints"):
        make_masker("attmask_hint", num_hints=-1)
    with pytest.raises(ValueError, match="show_max"):
        make_masker("attmask_hint", show_max=-0.1)
    with pytest.raises(ValueError, match="num_hints: random takes no such parameter; it takes"):
        make_masker("random", num_hints=3)  # only the hint strategy takes hints


@pytest.mark.parametrize("name", ALL)
def test_shape_dtype_and_determinism(name):
    m = make_masker(name)
    a = m(scores(), GRID, gen(1))
    b = m(scores(), GRID, gen(1))
    c = m(scores(), GRID, gen(2))
    assert a.shape == (64, P) and a.dtype == torch.bool
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.37, 0.5])
@pytest.mark.parametrize("name", ["random", "attmask_high", "attmask_low"])
def test_exact_count_floor_of_ratio(name, ratio):
    mask = make_masker(name, ratio=(ratio, ratio), prob=1.0)(scores(), GRID, gen())
    assert (mask.sum(1) == math.floor(P * ratio)).all()


def test_block_masks_at_most_n_contiguous_and_close_to_target():
    m = make_masker("block", ratio=(0.3, 0.3), prob=1.0)
    mask = m(None, GRID, gen(), batch_size=512)
    n = math.floor(P * 0.3)
    counts = mask.sum(1)
    assert (counts <= n).all() and (counts > 0).all()
    assert counts.float().mean() > 0.9 * n  # BEiT's generator undershoots only slightly
    grid = mask.view(-1, *GRID).float()
    neighbours = (grid[:, 1:] * grid[:, :-1]).sum() + (grid[:, :, 1:] * grid[:, :, :-1]).sum()
    rand = make_masker("random", ratio=(0.3, 0.3), prob=1.0)(None, GRID, gen(), batch_size=512)
    rgrid = rand.view(-1, *GRID).float()
    rand_neighbours = (rgrid[:, 1:] * rgrid[:, :-1]).sum() + (rgrid[:, :, 1:] * rgrid[:, :, :-1]).sum()
    assert neighbours > 2 * rand_neighbours  # rectangles, not scattered patches


@pytest.mark.parametrize("name", ALL)
def test_prob_leaves_whole_images_unmasked(name):
    m0 = make_masker(name, prob=0.0)
    assert not m0(scores(), GRID, gen(), batch_size=64).any()
    m = make_masker(name, prob=0.5, ratio=(0.2, 0.2))
    masked_rows = m(scores(4096), GRID, gen(), batch_size=4096).any(1).float().mean()
    assert 0.45 < masked_rows < 0.55  # Bernoulli(0.5) per image, random and block included


@pytest.mark.parametrize("name", ["random", "attmask_high", "attmask_low", "block"])
def test_ratio_drawn_per_image_or_per_batch(name):
    per_image = make_masker(name, prob=1.0)(scores(), GRID, gen(), batch_size=64)
    assert per_image.sum(1).unique().numel() > 5
    per_batch = make_masker(name, prob=1.0, ratio_per="batch")
    counts = per_batch(scores(), GRID, gen(), batch_size=64).sum(1)
    if name != "block":
        assert counts.unique().numel() == 1
    low, high = math.floor(P * 0.1), math.floor(P * 0.5)
    assert (counts >= (0 if name == "block" else low)).all() and (counts <= high).all()


def test_attmask_high_and_low_pick_extreme_scores():
    s = scores()
    n = math.floor(P * 0.3)
    high = make_masker("attmask_high", ratio=(0.3, 0.3), prob=1.0)(s, GRID, gen())
    low = make_masker("attmask_low", ratio=(0.3, 0.3), prob=1.0)(s, GRID, gen())
    top = s.topk(n, dim=1).indices
    bottom = (-s).topk(n, dim=1).indices
    assert torch.equal(high, torch.zeros_like(high).scatter_(1, top, True))
    assert torch.equal(low, torch.zeros_like(low).scatter_(1, bottom, True))


def test_attmask_hint_reveals_num_hints_from_the_top_set():
    s = scores()
    show_max, k = 0.1, 4
    top_count = math.floor(P * show_max)
    hint = make_masker("attmask_hint", ratio=(0.3, 0.3), prob=1.0, show_max=show_max,
                       num_hints=k)(s, GRID, gen())
    high = make_masker("attmask_high", ratio=(0.3, 0.3), prob=1.0)(s, GRID, gen())
    revealed = high & ~hint
    assert (hint & ~high).sum() == 0  # hints only un-hide
    assert (revealed.sum(1) == k).all()
    top_set = torch.zeros_like(high).scatter_(1, s.topk(top_count, dim=1).indices, True)
    assert (revealed & ~top_set).sum() == 0  # every hint is among the most attended
    # hints are drawn at random within the top set, not always the same k ranks
    ranks = s.argsort(dim=1, descending=True).argsort(dim=1)
    assert ranks[revealed].unique().numel() > k


def test_attmask_hint_derived_count_uses_a_second_ratio_draw():
    s = scores(512)
    hint = make_masker("attmask_hint", prob=1.0, show_max=0.1)(s, GRID, gen())
    # masked = floor(P r) - floor(P * show_max * r2), r, r2 ~ U(0.1, 0.5) independent
    counts = hint.sum(1)
    lo = math.floor(P * 0.1) - math.floor(P * 0.1 * 0.5)
    hi = math.floor(P * 0.5) - math.floor(P * 0.1 * 0.1)
    assert (counts >= lo).all() and (counts <= hi).all()
    high = make_masker("attmask_high", prob=1.0)(s, GRID, gen())  # same first draws
    revealed = (high & ~hint).sum(1)
    assert revealed.min() >= math.floor(P * 0.1 * 0.1) and revealed.max() <= math.floor(P * 0.05)
    assert revealed.unique().numel() > 3  # k varies: a fresh draw, not a constant


def test_scores_none_needs_batch_size_and_attention_strategies_need_scores():
    with pytest.raises(ValueError, match="batch_size"):
        make_masker("random")(None, GRID)
    assert make_masker("random", batch_size=3)(None, GRID).shape == (3, P)
    with pytest.raises(ValueError, match="needs attention scores"):
        make_masker("attmask_high")(None, GRID, batch_size=3)
    with pytest.raises(ValueError, match="does not match grid"):
        make_masker("attmask_high")(torch.rand(2, 10), GRID)


def test_non_square_grid():
    mask = make_masker("block", prob=1.0, ratio=(0.4, 0.4))(None, (6, 10), gen(), batch_size=16)
    assert mask.shape == (16, 60) and (mask.sum(1) <= 24).all()


def test_attmask_hint_on_a_grid_that_reveals_nothing_is_an_error_naming_the_smallest_grid():
    """On a 4 x 4 grid floor(16 x 0.1 x r) = 0 for every ratio draw: Hint would be High."""
    from attmask.config import load_config
    from attmask.errors import ConfigError

    hint = make_masker("attmask_hint")
    assert hint.most_hints(16) == 0 and hint.most_hints(64) == 3
    with pytest.raises(ConfigError, match=r"4 x 4 patch grid.*smallest grid where it reveals one "
                                          r"is 5 x 5"):
        load_config(overrides=["masking.strategy=attmask_hint", "model.image_size=32",
                               "model.patch_size=8"])
    load_config(overrides=["masking.strategy=attmask_hint", "model.image_size=32",
                           "model.patch_size=4"])  # 8 x 8 reveals up to 3
    load_config(overrides=["masking.strategy=attmask_hint", "model.image_size=32",
                           "model.patch_size=8", "masking.options.attmask_hint.show_max=0.5"])
    scores = torch.rand(2000, 16)
    drawn = hint(scores, (4, 4), torch.Generator().manual_seed(0))
    high = make_masker("attmask_high")(scores, (4, 4), torch.Generator().manual_seed(0))
    assert torch.equal(drawn, high)  # what the error prevents: the two strategies are one
