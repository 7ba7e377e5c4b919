"""The public entry point and the nn.Module."""

import pytest
import torch
import torch.nn.functional as F

import blv_kernels
from blv_kernels import BLVLoss, blv_cross_entropy, reference


def _batch(rng, shape=(2, 6, 5, 7), ignore_index=255):
    logits = torch.randn(shape, generator=rng) * 2
    target = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=rng, dtype=torch.uint8)
    target[torch.rand(target.shape, generator=rng) < 0.2] = ignore_index
    counts = torch.randint(1, 10**5, (shape[1],), generator=rng).tolist()
    return logits, target, counts


def test_explicit_seed_equals_reference(rng):
    logits, target, counts = _batch(rng)
    kwargs = dict(seed=17, offset=3, ignore_index=255, reduction="sum", mode="clamp")
    ref = reference.blv_cross_entropy(logits, target, class_counts=counts, sigma=4.0, **kwargs)
    assert torch.equal(blv_cross_entropy(logits, target, class_counts=counts, sigma=4.0, backend="reference", **kwargs),
                       ref)  # fmt: skip
    # backend="auto" (a fused kernel where one runs here): the same stream, float32 rounding apart
    torch.testing.assert_close(blv_cross_entropy(logits, target, class_counts=counts, sigma=4.0, **kwargs), ref,
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_default_seed_follows_manual_seed_and_changes_per_call(rng):
    logits, target, counts = _batch(rng)
    torch.manual_seed(1234)
    first = blv_cross_entropy(logits, target, class_counts=counts, ignore_index=255)
    second = blv_cross_entropy(logits, target, class_counts=counts, ignore_index=255)
    torch.manual_seed(1234)
    assert torch.equal(blv_cross_entropy(logits, target, class_counts=counts, ignore_index=255), first)
    assert not torch.equal(first, second)
    gen = torch.Generator().manual_seed(7)
    a = blv_cross_entropy(logits, target, class_counts=counts, ignore_index=255, generator=gen)
    gen.manual_seed(7)
    assert torch.equal(blv_cross_entropy(logits, target, class_counts=counts, ignore_index=255, generator=gen), a)


def test_unknown_backend(rng):
    logits, target, counts = _batch(rng)
    with pytest.raises(ValueError, match="backend must be one of"):
        blv_cross_entropy(logits, target, class_counts=counts, backend="fast", ignore_index=255)


def test_module_trains_with_blv_and_evaluates_with_plain_ce(rng):
    logits, target, counts = _batch(rng)
    loss_fn = BLVLoss(counts, sigma=6.0, ignore_index=255)
    torch.manual_seed(0)
    train = loss_fn(logits, target)
    torch.manual_seed(0)
    assert torch.equal(train, blv_cross_entropy(logits, target, class_counts=counts, sigma=6.0, ignore_index=255))
    loss_fn.eval()
    assert torch.equal(loss_fn(logits, target), F.cross_entropy(logits, target.long(), ignore_index=255))


def test_module_buffers_follow_state_dict_and_replacement(rng):
    logits, target, counts = _batch(rng)
    weight = torch.rand(6, generator=rng) + 0.5
    loss_fn = BLVLoss(counts, weight=weight, ignore_index=255, reduction="sum")
    state = loss_fn.state_dict()
    assert set(state) == {"variation_weight", "weight"}
    torch.testing.assert_close(state["variation_weight"], blv_kernels.class_weights(counts))
    new_counts = torch.randint(1, 10**5, (6,), generator=rng).tolist()
    loss_fn.set_class_counts(new_counts)
    torch.testing.assert_close(loss_fn.variation_weight, blv_kernels.class_weights(new_counts))
    other = BLVLoss(counts, weight=torch.ones(6), ignore_index=255, reduction="sum")
    other.load_state_dict(loss_fn.state_dict())
    assert torch.equal(other(logits, target, seed=5), loss_fn(logits, target, seed=5))
    assert torch.equal(
        loss_fn(logits, target, seed=5),
        blv_cross_entropy(
            logits, target, class_counts=new_counts, weight=weight, ignore_index=255, reduction="sum", seed=5
        ),
    )
    with pytest.raises(ValueError, match="expected 6 class counts"):
        loss_fn.set_class_counts([1, 2, 3])


def test_module_sigma_is_settable(rng):
    logits, target, counts = _batch(rng)
    loss_fn = BLVLoss(counts, ignore_index=255, backend="reference")
    loss_fn.sigma = 0.0  # bit for bit plain cross-entropy on the reference
    assert torch.equal(loss_fn(logits, target), F.cross_entropy(logits, target.long(), ignore_index=255))


def test_gradient_flows(rng):
    logits, target, counts = _batch(rng)
    logits.requires_grad_(True)
    blv_cross_entropy(logits, target, class_counts=counts, ignore_index=255, seed=1).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [({"sigma": -1.0}, ValueError, "sigma"), ({"sigma": "6"}, TypeError, "sigma"), ({"mode": "x"}, ValueError, "mode"),
     ({"reduction": "avg"}, ValueError, "reduction")],
    ids=["negative-sigma", "string-sigma", "mode", "reduction"],
)  # fmt: skip
def test_bad_options_named_at_construction_and_call(kwargs, error, match, rng):
    logits, target, counts = _batch(rng)
    with pytest.raises(error, match=match):
        BLVLoss(counts, **kwargs)
    with pytest.raises(error, match=match):
        blv_cross_entropy(logits, target, class_counts=counts, ignore_index=255, **{"sigma": 6.0, **kwargs})
