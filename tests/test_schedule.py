"""The temporal sigma schedule: values at its corners, both shapes, and setting sigma on losses."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from blv_kernels import BLVLoss, blv_cross_entropy
from blv_kernels.integrations import SigmaSchedule
from blv_kernels.noise import SIGMA_MAX


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_corners(shape):
    s = SigmaSchedule(6.0, t_mid=30_000, t_end=40_000, shape=shape, sigma_start=1.0, sigma_end=0.5)
    assert s(0) == 1.0
    assert s(30_000) == 6.0  # the peak sigma_0 at t_mid
    assert s(40_000) == 0.5 and s(10**6) == 0.5  # sigma_end from t_end on
    assert s(15_000) == pytest.approx(3.5) and s(35_000) == pytest.approx(3.25)  # both shapes: halfway at the middle
    assert max(s(t) for t in range(0, 50_000, 100)) == 6.0


def test_linear_and_cosine_differ_in_between():
    lin = SigmaSchedule(6.0, 100, 200)
    cos = SigmaSchedule(6.0, 100, 200, shape="cosine")
    assert lin(25) == pytest.approx(1.5) and lin(150) == pytest.approx(3.0)
    assert cos(25) == pytest.approx(6.0 * (1 - math.cos(math.pi / 4)) / 2)
    assert cos(1) < lin(1) and cos(99) > lin(99)  # the cosine leaves and reaches the peak flat


def test_degenerate_legs():
    no_rise = SigmaSchedule(4.0, t_mid=0, t_end=10)
    assert no_rise(0) == 4.0 and no_rise(5) == pytest.approx(2.0) and no_rise(10) == 0.0
    no_fall = SigmaSchedule(4.0, t_mid=10, t_end=10, sigma_end=4.0)
    assert no_fall(5) == pytest.approx(2.0) and no_fall(10) == 4.0 and no_fall(11) == 4.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sigma_0=-1.0, t_mid=1, t_end=2), "sigma_0 must be"),
        (dict(sigma_0=float("nan"), t_mid=1, t_end=2), "sigma_0 must be"),
        (dict(sigma_0=6.0, t_mid=3, t_end=2), "t_mid <= t_end"),
        (dict(sigma_0=6.0, t_mid=0, t_end=0), "t_end > 0"),
        (dict(sigma_0=6.0, t_mid=1, t_end=2, shape="step"), "shape must be one of"),
        (dict(sigma_0=6.0, t_mid=1, t_end=2, sigma_end=-0.1), "sigma_end must be"),
        (dict(sigma_0=6.0, t_mid=-1, t_end=2), "t_mid must be an integer >= 0"),
        # beyond the loss's sigma bound: refused here, not at the step that reaches it
        (dict(sigma_0=1e38, t_mid=10, t_end=20), r"sigma_0 must be a finite number >= 0.0 and <= 1e\+37, got 1e\+38"),
        (dict(sigma_0=6.0, t_mid=10, t_end=20, sigma_start=1e38), r"sigma_start must be .* <= 1e\+37"),
        (dict(sigma_0=6.0, t_mid=10, t_end=20, sigma_end=1e38), r"sigma_end must be .* <= 1e\+37"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SigmaSchedule(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sigma_0=True, t_mid=1, t_end=2), "sigma_0 must be a number"),
        (dict(sigma_0="6", t_mid=1, t_end=2), "sigma_0 must be a number"),
        (dict(sigma_0=6.0, t_mid=1.5, t_end=2), "t_mid must be an integer"),
        (dict(sigma_0=6.0, t_mid=1, t_end="2"), "t_end must be an integer"),
    ],
)
def test_arguments_of_the_wrong_type(kwargs, match):
    with pytest.raises(TypeError, match=match):
        SigmaSchedule(**kwargs)


def test_sigma_up_to_the_loss_bound_is_taken():
    s = SigmaSchedule(SIGMA_MAX, t_mid=10, t_end=20, shape="cosine", sigma_start=SIGMA_MAX, sigma_end=SIGMA_MAX)
    loss = BLVLoss([1, 2, 3])
    assert all(s.step(loss, t) == SIGMA_MAX for t in (0, 5, 10, 15, 20))


def test_numpy_scalars_are_numbers(rng):
    sigma_0, sigma_start, sigma_end = (torch.rand(3, generator=rng) * 6).tolist()
    t_mid, t_end = sorted(torch.randint(1, 10_000, (2,), generator=rng).tolist())
    plain = SigmaSchedule(sigma_0, t_mid, t_end + 1, "cosine", sigma_start, sigma_end)
    from_numpy = SigmaSchedule(
        np.float32(sigma_0), np.int64(t_mid), np.int32(t_end + 1), "cosine", np.float64(sigma_start),
        np.float32(sigma_end),
    )  # fmt: skip
    assert type(from_numpy.sigma_0) is float and type(from_numpy.t_mid) is int  # kept as Python numbers
    for t in torch.randint(0, t_end + 100, (20,), generator=rng).tolist():
        assert from_numpy(np.int64(t)) == pytest.approx(plain(t), rel=1e-6)


def test_bad_iteration():
    with pytest.raises(ValueError, match="iteration must be an integer >= 0"):
        SigmaSchedule(6.0, 1, 2)(-1)
    with pytest.raises(TypeError, match="iteration must be an integer"):
        SigmaSchedule(6.0, 1, 2)(0.5)


def test_step_sets_sigma_on_every_blv_loss(rng):
    counts = torch.randint(1, 1000, (5,), generator=rng).tolist()
    model = nn.ModuleDict({"head": nn.Conv2d(3, 5, 1), "loss": BLVLoss(counts), "aux_loss": BLVLoss(counts)})
    schedule = SigmaSchedule(6.0, t_mid=10, t_end=20)
    assert schedule.step(model, 5) == 3.0
    assert model["loss"].sigma == 3.0 and model["aux_loss"].sigma == 3.0

    # the loss then uses it: same as blv_cross_entropy with that sigma
    logits = torch.randn(2, 5, 3, 4, generator=rng)
    target = torch.randint(0, 5, (2, 3, 4), generator=rng)
    loss = model["loss"]
    schedule.step(loss, 15)
    torch.manual_seed(0)
    tri = loss(logits, target)
    torch.manual_seed(0)
    torch.testing.assert_close(tri, blv_cross_entropy(logits, target, class_counts=counts, sigma=schedule(15)))


def test_step_needs_a_blv_loss():
    with pytest.raises(ValueError, match="no BLVLoss found"):
        SigmaSchedule(6.0, 1, 2).step(nn.Linear(2, 2), 0)
    with pytest.raises(TypeError, match="expected a BLVLoss"):
        SigmaSchedule(6.0, 1, 2).step([BLVLoss([1, 2])], 0)
