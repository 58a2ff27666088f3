"""Training losses on one output scale, with the real depths of the HER2+ sections."""

import numpy as np
import pytest
import torch

from napari_m2ort.errors import M2ORTError
from napari_m2ort.losses import LOSSES, CountLoss, check_loss


def _batch(seed=0, depth=(150.0, 3000.0)):
    g = torch.Generator().manual_seed(seed)
    counts = torch.poisson(torch.rand(len(depth), 5, generator=g) * torch.tensor(depth)[:, None] / 5, generator=g)
    d = counts.sum(1)
    target = torch.log1p(counts * 1e6 / d[:, None])
    return target, counts, d


def test_mse_is_the_spec_loss():
    target, counts, depth = _batch()
    pred = target + 0.5
    assert CountLoss("mse")(pred, target).item() == pytest.approx(0.25)


def test_mse_depth_trusts_deep_spots_more():
    target, counts, depth = _batch()
    pred = target.clone()
    pred[0] += 1.0  # error on the shallow spot (150 counts)
    shallow = CountLoss("mse_depth", 5, depth_k=1000)(pred, target, counts, depth).item()
    pred = target.clone()
    pred[1] += 1.0  # the same error on the deep spot (3000 counts)
    deep = CountLoss("mse_depth", 5, depth_k=1000)(pred, target, counts, depth).item()
    assert deep > 3 * shallow


@pytest.mark.parametrize("name", ["poisson", "nb"])
def test_count_losses_are_smallest_near_the_truth_and_have_finite_gradients(name):
    target, counts, depth = _batch()
    loss = CountLoss(name, 5)
    values = {}
    for shift in (-1.0, 0.0, 1.0):
        pred = (target + shift).clone().requires_grad_(True)
        out = loss(pred, target, counts, depth)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(pred.grad).all()
        values[shift] = out.item()
    assert values[0.0] < values[-1.0] and values[0.0] < values[1.0]
    pred = torch.zeros_like(target, requires_grad=True)  # a predicted 0 stays finite
    loss(pred, target, counts, depth).backward()
    assert torch.isfinite(pred.grad).all()


def test_count_losses_need_counts():
    target, _, _ = _batch()
    with pytest.raises(M2ORTError, match="raw panel counts"):
        CountLoss("poisson", 5)(target, target)
    with pytest.raises(M2ORTError, match="Unknown loss"):
        check_loss("huber")
    assert set(LOSSES) == {"mse", "mse_depth", "poisson", "nb"}
    assert np.isfinite(CountLoss("nb", 5).log_theta.detach().numpy()).all()
