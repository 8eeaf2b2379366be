"""The KoLeo term (ibot_fast/loss/koleo.py, ``--koleo_weight``): by hand on points of the
circle, its invariances, the per-view sum, bad input; both step paths carry it equally."""
from __future__ import annotations

import math

import pytest
import torch

from ibot_fast.loss.koleo import koleo_loss, koleo_views
from helpers import compare_with_reference


def _circle(*degrees):
    a = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1)


def test_koleo_by_hand_on_the_circle():
    # 0° and 60° are each other's nearest neighbours (chord 2 sin 30° = 1); 180°'s nearest is
    # 60° (120° apart, chord 2 sin 60° = √3): -(log 1 + log 1 + log √3) / 3
    got = koleo_loss(_circle(0, 60, 180), eps=0.0)
    torch.testing.assert_close(got, torch.tensor(-math.log(3) / 6, dtype=torch.float64))


def test_koleo_normalises_and_ignores_order():
    x = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    scale = torch.rand(7, 1, dtype=torch.float64) + 0.5
    perm = torch.randperm(7)
    torch.testing.assert_close(koleo_loss(x * scale), koleo_loss(x))
    torch.testing.assert_close(koleo_loss(x[perm]), koleo_loss(x))


def test_koleo_gradient_spreads_the_closest_pair():
    """One gradient step moves the two closest points apart (the term's purpose), and the
    neighbour choice carries no gradient (the loss is the mean log-distance to fixed nns)."""
    x = _circle(0, 10, 120, 240).requires_grad_(True)
    koleo_loss(x).backward()
    y = torch.nn.functional.normalize(x.detach() - 0.01 * x.grad, dim=1)
    before = (x[0] - x[1]).norm().item()
    assert (y[0] - y[1]).norm().item() > before
    # by hand: nn(0)=1, nn(1)=0, nn(2)=1 (110°) ... the same value through fixed indices
    xd = torch.nn.functional.normalize(x.detach(), dim=1)
    nn_idx = torch.tensor([1, 0, 1, 0])  # 240° is 120° from 0° and 130° from 10°
    want = -torch.log((xd - xd[nn_idx]).norm(dim=1) + 1e-8).mean()
    torch.testing.assert_close(koleo_loss(x.detach()), want)


def test_koleo_views_sums_within_each_view():
    x = torch.randn(2 * 6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(koleo_views(x, 2), koleo_loss(x[:6]) + koleo_loss(x[6:]))
    assert not torch.allclose(koleo_views(x, 2), koleo_loss(x))  # not one pool of 12


@pytest.mark.parametrize("shape, views", [((1, 4), 1), ((4,), 1), ((5, 3), 2)])
def test_koleo_bad_input(shape, views):
    with pytest.raises(ValueError):
        koleo_views(torch.randn(*shape), views) if views > 1 else koleo_loss(torch.randn(*shape))


@pytest.mark.parametrize("extra", [[], ["--head_tokens", "all"]], ids=["selected", "all-tokens"])
def test_koleo_step_equals_reference_path_fp64(tmp_path, extra):
    """``--koleo_weight`` on both step paths: the same KoLeo value, loss (= cls + patch +
    weight · koleo), gradients, weights, teacher and centres in fp64."""
    ref, fast = compare_with_reference(tmp_path, extra, ref_extra=["--koleo_weight", "0.5"],
                                       steps=2)
    images, _, masks = next(iter(fast.loader))
    out = fast.train_step([im.double() for im in images], masks, 1, fast.iters_per_epoch)
    assert out["koleo"] != 0
    torch.testing.assert_close(out["loss"], out["cls"] + out["patch"] + 0.5 * out["koleo"])
