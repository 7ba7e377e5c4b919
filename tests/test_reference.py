"""The plain-PyTorch reference: F.cross_entropy semantics, the formula, edge cases, bad input."""

import pytest
import torch
import torch.nn.functional as F
from grid import Case, loss_and_grad, make_inputs

from blv_kernels import blv_cross_entropy, class_weights, variation


def reference_blv(*args, **kwargs):
    """blv_cross_entropy on the reference backend."""
    return blv_cross_entropy(*args, backend="reference", **kwargs)


SHAPES = {"NC": (6, 5), "NCHW": (2, 5, 3, 4), "NCDHW": (2, 4, 2, 3, 3)}


def _batch(shape, rng, *, dtype=torch.float32, ignore_index=-100, ignore_ratio=0.3):
    logits = torch.randn(shape, generator=rng, dtype=dtype) * 3
    c = shape[1]
    target = torch.randint(0, c, shape[:1] + shape[2:], generator=rng)
    target[torch.rand(target.shape, generator=rng) < ignore_ratio] = ignore_index
    counts = torch.randint(1, 10**6, (c,), generator=rng)
    weight = torch.rand(c, generator=rng, dtype=dtype) + 0.5
    return logits, target, counts, weight


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("with_weight", [False, True], ids=["", "weight"])
def test_sigma_zero_is_exactly_cross_entropy(shape, reduction, with_weight, rng):
    logits, target, counts, weight = _batch(shape, rng, ignore_index=7)
    weight = weight if with_weight else None
    ref = reference_blv(
        logits, target, class_counts=counts, sigma=0.0, seed=1, weight=weight, ignore_index=7, reduction=reduction
    )
    plain = F.cross_entropy(logits, target, weight=weight, ignore_index=7, reduction=reduction)
    # bit for bit; the mean over labels that are all ignored (a few of 6 drawn) is NaN in both
    torch.testing.assert_close(ref, plain, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("with_weight", [False, True], ids=["", "weight"])
def test_explicit_variation_matches_formula_in_float64(shape, reduction, with_weight, rng):
    logits, target, counts, weight = _batch(shape, rng, dtype=torch.float64)
    weight = weight if with_weight else None
    v = torch.rand(shape, generator=rng)
    logits.requires_grad_(True)
    loss = reference_blv(
        logits, target, class_counts=counts, sigma=6.0, variation=v, weight=weight, reduction=reduction
    )

    # Direct evaluation: z = x + v*w, l = logsumexp(z) - z_t, on the (N, C, S) view.
    n, c = shape[:2]
    w = class_weights(counts).double()
    x = logits.detach().reshape(n, c, -1)
    z = x + v.double().reshape(n, c, -1) * w[None, :, None]
    t = target.reshape(n, -1)
    valid = t != -100
    t0 = t.clamp_min(0)
    per = torch.logsumexp(z, dim=1) - z.gather(1, t0[:, None]).squeeze(1)
    cw = weight[t0] if weight is not None else torch.ones_like(per)
    cw = cw * valid
    per = per * cw
    expected = {"none": per.reshape(target.shape), "sum": per.sum(), "mean": per.sum() / cw.sum()}[reduction]
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)

    # Gradient: (softmax(z) - onehot(t)) scaled by the class weight and the reduction.
    grad_out = torch.randn(loss.shape, generator=rng, dtype=torch.float64)
    (grad,) = torch.autograd.grad(loss, logits, grad_out)
    onehot = F.one_hot(t0, c).permute(0, 2, 1).double()
    scale = grad_out.reshape(n, -1) if reduction == "none" else grad_out / (cw.sum() if reduction == "mean" else 1)
    expected_grad = (torch.softmax(z, dim=1) - onehot) * (cw * scale)[:, None, :]
    torch.testing.assert_close(grad, expected_grad.reshape(shape), rtol=1e-12, atol=1e-12)


def test_stream_variation_equals_explicit_variation(rng):
    logits, target, counts, _ = _batch((2, 19, 5, 7), rng)
    v = variation(logits.shape, 6.0, seed=99, offset=123, mode="clamp")
    a = reference_blv(logits, target, class_counts=counts, sigma=6.0, seed=99, offset=123, mode="clamp")
    b = reference_blv(logits, target, class_counts=counts, sigma=6.0, variation=v)
    assert torch.equal(a, b)
    assert not torch.equal(a, F.cross_entropy(logits, target))


@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.int32, torch.int64])
def test_target_dtypes(target_dtype, rng):
    logits, target, counts, _ = _batch((2, 5, 4, 6), rng, ignore_index=255)
    expected = reference_blv(logits, target, class_counts=counts, sigma=4.0, seed=5, ignore_index=255)
    got = reference_blv(logits, target.to(target_dtype), class_counts=counts, sigma=4.0, seed=5, ignore_index=255)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_logits_round_once(dtype, reduction, rng):
    # z and the softmax in float32, the loss and gradient rounded once to the logits' dtype. So each
    # value is as close to the float64 ground truth (the reference on the same logits in float64)
    # as PyTorch's rounding of that ground truth to the dtype can be, half an ulp (eps/2 relative;
    # half the subnormal spacing near 0), plus the float32 evaluation's error (1e-5 relative, 1e-6
    # at the result's scale). Per element: grid.assert_as_close_as_reference's max-over-elements
    # form, made for a backend against the reference, leaves a whole ulp here and passes z rounded
    # to the dtype (an error of up to half an ulp of |z|, in every softmax term) on some inputs.
    case = Case((2, 19, 6, 10), dtype=dtype, reduction=reduction)
    inputs = make_inputs(case, rng)
    seed = int(torch.randint(0, 2**62, (), generator=rng))
    loss_shape = inputs.target.shape if reduction == "none" else ()
    grad_out = torch.randn(loss_shape, generator=rng).to(dtype).double()  # exact in the dtype: both runs see it
    loss, grad = loss_and_grad("reference", case, inputs, seed, grad_out)
    assert loss.dtype == grad.dtype == dtype
    ground_truth = loss_and_grad("reference", case, inputs, seed, grad_out, inputs.logits.double())
    info = torch.finfo(dtype)
    for ours, gt in zip((loss, grad), ground_truth, strict=True):
        atol = info.smallest_normal * info.eps / 2 + 1e-6 * gt.abs().max().item()
        torch.testing.assert_close(ours.double(), gt, rtol=info.eps / 2 + 1e-5, atol=atol)


def test_position_weight(rng):
    logits, target, counts, weight = _batch((2, 5, 4, 6), rng)
    pw = torch.rand(target.shape, generator=rng) + 0.1
    per = reference_blv(logits, target, class_counts=counts, sigma=6.0, seed=3, weight=weight, reduction="none")
    got = {r: reference_blv(logits, target, class_counts=counts, sigma=6.0, seed=3, weight=weight, reduction=r,
                                          position_weight=pw) for r in ("none", "sum", "mean")}  # fmt: skip
    torch.testing.assert_close(got["none"], per * pw)
    torch.testing.assert_close(got["sum"], (per * pw).sum())
    valid = target != -100
    torch.testing.assert_close(got["mean"], (per * pw).sum() / weight[target.clamp_min(0)][valid].sum())


def test_nothing_valid_mean_is_nan_like_pytorch(rng):
    logits, target, counts, _ = _batch((2, 5, 3), rng)
    target.fill_(-100)
    loss = reference_blv(logits, target, class_counts=counts, sigma=6.0, seed=1)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(logits, target))
    assert reference_blv(logits, target, class_counts=counts, sigma=6.0, seed=1, reduction="sum") == 0


def test_degenerate_prior_is_plain_cross_entropy(rng):
    logits, target, _, _ = _batch((4, 1, 3), rng)
    loss = reference_blv(logits, target, class_counts=[10], sigma=6.0, seed=1)
    assert torch.equal(loss, F.cross_entropy(logits, target))


def _bad_inputs():
    x = torch.randn(2, 3, 4)
    t = torch.randint(0, 3, (2, 4))
    return [
        ("rank-1", (torch.randn(3), t), {}, ValueError, "shape"),
        ("no-classes", (torch.randn(2, 0, 4), t), {"class_counts": []}, ValueError, "at least one class"),
        ("int-logits", (t, t), {}, TypeError, "logits must be float"),
        ("float-target", (x, t.float()), {}, TypeError, "integer class indices"),
        ("bool-target", (x, t.bool()), {}, TypeError, "integer class indices"),
        ("target-shape", (x, t[:, :3]), {}, ValueError, r"target shape \(2, 3\) does not match"),
        ("counts-length", (x, t), {"class_counts": [1, 2]}, ValueError, "2 entries but logits have C=3"),
        ("zero-count", (x, t), {"class_counts": [1, 0, 2]}, ValueError, "zero count"),
        ("negative-count", (x, t), {"class_counts": [1, -1, 2]}, ValueError, "non-negative"),
        ("nan-count", (x, t), {"class_counts": [1, float("nan"), 2]}, ValueError, "finite"),
        ("negative-sigma", (x, t), {"sigma": -1.0}, ValueError, "sigma"),
        ("tensor-sigma", (x, t), {"sigma": torch.tensor(6.0)}, TypeError, "sigma must be a Python number"),
        ("mode", (x, t), {"mode": "normal"}, ValueError, "mode"),
        ("reduction", (x, t), {"reduction": "avg"}, ValueError, "reduction"),
        ("label-too-big", (x, torch.full((2, 4), 3)), {}, ValueError, r"outside \[0, 3\).*first: 3"),
        ("label-negative", (x, torch.full((2, 4), -2)), {}, ValueError, r"outside \[0, 3\)"),
        ("uint8-label", (x, torch.full((2, 4), 200, dtype=torch.uint8)), {"ignore_index": 255}, ValueError,
         "first: 200"),
        ("weight-shape", (x, t, torch.ones(4)), {}, ValueError, r"weight must have shape \(3,\)"),
        ("variation-shape", (x, t), {"variation": torch.rand(2, 3)}, ValueError, "variation shape"),
        ("position-weight", (x, t), {"position_weight": torch.ones(2, 3)}, ValueError, "position_weight shape"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "args, kwargs, error, match", [c[1:] for c in _bad_inputs()], ids=[c[0] for c in _bad_inputs()]
)
def test_bad_inputs(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        reference_blv(*args, **{"class_counts": [5, 6, 7], "seed": 0, **kwargs})


def test_avg_factor_divides_the_weighted_sum(rng):
    logits, target, counts, weight = _batch((2, 5, 4, 6), rng)
    pw = torch.rand(target.shape, generator=rng) + 0.1
    per = reference_blv(logits, target, class_counts=counts, sigma=6.0, seed=3, weight=weight, reduction="none")
    for avg_factor in (target.numel(), torch.tensor(17.5)):
        got = reference_blv(
            logits,
            target,
            class_counts=counts,
            sigma=6.0,
            seed=3,
            weight=weight,
            position_weight=pw,
            avg_factor=avg_factor,
        )
        torch.testing.assert_close(got, (per * pw).sum() / avg_factor)
    with pytest.raises(ValueError, match="avg_factor"):
        reference_blv(logits, target, class_counts=counts, sigma=6.0, seed=3, reduction="sum", avg_factor=3.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_logits_take_the_shift_in_float32(dtype, rng):
    # bf16 logits near 256 are 2 apart: a shift v*w in [0, 1] rounded to bf16 would become 0 or 2.
    # The semantics: perturbed logits and softmax in float32, the result in the logits' dtype.
    logits = (torch.randn(64, 5, generator=rng) + 256).to(dtype)
    target = torch.randint(0, 5, (64,), generator=rng)
    counts = [1000, 100, 10, 5, 1]
    half = reference_blv(logits, target, class_counts=counts, seed=7)
    single = reference_blv(logits.float(), target, class_counts=counts, seed=7)
    assert half.dtype == dtype
    assert half == single.to(dtype)


@pytest.mark.parametrize("shape", [(0, 5, 3), (2, 5, 0), (0, 5)], ids=["empty-batch", "empty-space", "empty-rows"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_empty_inputs_like_cross_entropy(shape, reduction):
    logits = torch.randn(shape, requires_grad=True)
    target = torch.zeros(shape[:1] + shape[2:], dtype=torch.int64)
    loss = reference_blv(logits, target, class_counts=[1, 2, 3, 4, 5], sigma=6.0, reduction=reduction)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, reduction=reduction), equal_nan=True)
    loss.sum().backward()
    assert logits.grad.shape == logits.shape


def test_per_sample_gradients_with_vmap_over_logits_and_labels(rng):
    # torch.func's vmap(grad(loss)) over samples and their labels, as with F.cross_entropy: the
    # label check cannot count under vmap, so F.cross_entropy's own refuses a bad label there
    x, target = torch.randn(4, 5, 3, 3, generator=rng), torch.randint(0, 5, (4, 3, 3), generator=rng)
    target[0, 0, 0] = 255

    def loss(z, y):
        return blv_cross_entropy(z[None], y[None], class_counts=[5, 1, 30, 7, 2], seed=3, ignore_index=255,
                                 backend="reference")  # fmt: skip

    per_sample = torch.func.vmap(torch.func.grad(loss))(x, target)
    torch.testing.assert_close(per_sample, torch.stack([torch.func.grad(loss)(x[i], target[i]) for i in range(4)]))
    target[1, 2, 2] = 5
    with pytest.raises(RuntimeError, match="index 5 is out of bounds"):
        torch.func.vmap(torch.func.grad(loss))(x, target)
