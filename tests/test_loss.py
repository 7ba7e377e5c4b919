"""The public entry point and the nn.Module."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_backends import FUSED, skip_unless_runs

import blv_kernels
from blv_kernels import BLVLoss, blv_cross_entropy


def _batch(rng, shape=(2, 6, 5, 7), ignore_index=255):
    logits = torch.randn(shape, generator=rng) * 2
    target = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=rng, dtype=torch.uint8)
    target[torch.rand(target.shape, generator=rng) < 0.2] = ignore_index
    counts = torch.randint(1, 10**5, (shape[1],), generator=rng).tolist()
    return logits, target, counts


def test_explicit_seed_equals_reference(rng):
    logits, target, counts = _batch(rng)
    kwargs = dict(seed=17, offset=3, ignore_index=255, reduction="sum", mode="clamp")
    ref = blv_cross_entropy(logits, target, class_counts=counts, sigma=4.0, backend="reference", **kwargs)
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


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_checks_the_same_in_eval_as_in_training(training, rng):
    logits, target, counts = _batch(rng)
    loss_fn = BLVLoss(counts, ignore_index=255).train(training)
    with pytest.raises(
        ValueError, match=r"^logits have C=5 classes, but this loss was built for 6 \(its class counts\)$"
    ):
        loss_fn(logits[:, :5], target.clamp_max(4))  # logits of another class count
    target[0, 0, 0] = 6
    with pytest.raises(ValueError, match=r"target has 1 value\(s\) outside \[0, 6\) .* \(first: 6\)"):
        loss_fn(logits, target)  # not PyTorch's IndexError in eval()


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


@pytest.mark.parametrize("cast", ["half", "bfloat16"])
def test_module_wide_half_cast_keeps_sigma_and_the_weights_exact(cast, rng):
    # sigma's [scale, threshold] live as int32 bits and the variation weights stay float32 through a
    # whole-model .half() / .bfloat16(): float32 logits keep the same loss (same seed). Random counts
    # give weights that half precision would round.
    logits, target, counts = _batch(rng)
    weight = torch.rand(6, generator=rng) + 0.5
    loss_fn = BLVLoss(counts, sigma=0.5, weight=weight, ignore_index=255)  # scale, threshold: not half-exact
    params = loss_fn.variation_params.clone()
    before = loss_fn(logits, target, seed=5)
    assert not torch.equal(loss_fn.variation_weight.to(getattr(torch, cast)).float(), loss_fn.variation_weight)
    assert not torch.equal(weight.to(getattr(torch, cast)).float(), weight)
    getattr(loss_fn, cast)()
    assert torch.equal(loss_fn.variation_weight, blv_kernels.class_weights(counts))  # float32, as they were
    assert torch.equal(loss_fn.weight, weight)
    assert torch.equal(loss_fn.variation_params, params)
    assert torch.equal(loss_fn(logits, target, seed=5), before)
    loss_fn.sigma = 4.0  # and a sigma set after the cast
    assert torch.equal(
        loss_fn(logits, target, seed=5),
        BLVLoss(counts, sigma=4.0, weight=weight, ignore_index=255)(logits, target, seed=5),
    )


def test_gradient_flows(rng):
    logits, target, counts = _batch(rng)
    logits.requires_grad_(True)
    blv_cross_entropy(logits, target, class_counts=counts, ignore_index=255, seed=1).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [({"seed": torch.tensor(1, device="meta")}, "the seed is a meta tensor: it holds no value"),
     ({"avg_factor": torch.tensor(3.0, device="meta")}, "avg_factor is a meta tensor: it holds no value")],
    ids=["seed", "avg_factor"],
)  # fmt: skip
def test_meta_scalars_are_named(kwargs, match, rng):
    # (they raised torch's "Cannot copy out of meta tensor; no data!")
    logits, target, counts = _batch(rng)
    with pytest.raises(ValueError, match=match):
        blv_cross_entropy(logits, target, class_counts=counts, ignore_index=255, **kwargs)


def test_draw_seed_and_complex_weights_are_named():
    with pytest.raises(TypeError, match="generator must be a torch.Generator, got int"):
        blv_kernels.loss.draw_seed(torch.device("cpu"), generator=3)
    with pytest.raises(TypeError, match="weight must be real numbers, got a torch.complex64 tensor"):
        BLVLoss([1, 2, 3], weight=torch.ones(3, dtype=torch.complex64))  # (its imaginary part was dropped)


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


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(weight=torch.ones(6, requires_grad=True)), ValueError, "weight requires grad"),
        (dict(weight="abc"), TypeError, "weight must be a tensor or a list of numbers"),
        (dict(weight=[1e300] * 6), ValueError, r"weight must be finite in float32, got \[inf"),  # (was taken as inf)
        (dict(weight=[10**400] * 6), ValueError, "weight must be finite in float32"),  # (an OverflowError)
        (dict(weight=torch.full((6,), math.nan)), ValueError, "weight must be finite in float32"),
        (dict(backend=["cpu"]), ValueError, "backend must be one of"),
    ],
    ids=[
        "weight-requires-grad",
        "weight-string",
        "weight-beyond-float32",
        "weight-beyond-float64",
        "weight-nan",
        "backend-list",
    ],
)
def test_bad_module_arguments_named_at_construction(kwargs, error, match, rng):
    _, _, counts = _batch(rng)
    with pytest.raises(error, match=match):
        BLVLoss(counts, **kwargs)


def test_bad_call_arguments_named(rng):
    logits, target, counts = _batch(rng)
    with pytest.raises(TypeError, match="generator must be a torch.Generator, got int"):
        blv_cross_entropy(logits, target, class_counts=counts, ignore_index=255, generator=5)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda x: x[:1], ValueError, r"variation shape \(1, .*\) does not match logits shape"),
        (lambda x: x.to(torch.complex64), TypeError, "variation must be a floating-point tensor, got torch.complex64"),
        (lambda x: x.to(torch.int32), TypeError, "variation must be a floating-point tensor, got torch.int32"),
        (lambda x: x.to("meta"), ValueError, "variation is on meta but logits are on cpu"),
        (lambda x: x.to_sparse(), TypeError, "variation must be a dense .strided. tensor, got a sparse_coo one"),
    ],
    ids=["shape", "complex", "int", "device", "sparse"],
)  # fmt: skip
def test_bad_explicit_variation_is_named(make, error, match, rng):
    # (a complex one lost its imaginary part; one on another device failed in torch's words)
    logits, target, counts = _batch(rng)
    with pytest.raises(error, match=f"^{match}"):
        blv_cross_entropy(logits, target, class_counts=counts, ignore_index=255, variation=make(torch.rand_like(logits)),
                          backend="reference")  # fmt: skip


# ------------------------------------------------------------------ hardening: one rule for every backend

ALL_BACKENDS = ["reference", *FUSED]


def _backend(name):
    if name != "reference":
        skip_unless_runs(name)
    return name


@pytest.mark.parametrize("sigma", [torch.tensor(6), torch.tensor(6.0), True, "6"], ids=["int-tensor", "tensor", "bool",
                                                                                          "str"])  # fmt: skip
def test_sigma_must_be_a_number(sigma, rng):
    logits, target, counts = _batch(rng)
    with pytest.raises(TypeError, match="sigma must be a"):
        blv_cross_entropy(logits, target, class_counts=counts, sigma=sigma, ignore_index=255)
    with pytest.raises(TypeError, match="sigma must be a"):
        BLVLoss(counts, sigma)
    loss_fn = BLVLoss(counts)
    with pytest.raises(TypeError, match="sigma must be a"):
        loss_fn.sigma = sigma
    assert loss_fn.sigma == 6.0  # unchanged by the rejected value


def test_numpy_scalars_are_numbers(rng):
    logits, target, counts = _batch(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NumPy warned of an overflow when sigma was a float32
        loss_fn = BLVLoss(counts, np.float32(4.0), ignore_index=np.int64(255), label_smoothing=np.float64(0.1))
    expected = BLVLoss(counts, 4.0, ignore_index=255, label_smoothing=0.1)
    assert torch.equal(loss_fn(logits, target, seed=1), expected(logits, target, seed=1))


def test_offset_must_keep_the_stream_below_2_63(rng):
    logits, target, counts = _batch(rng)
    positions = target.numel()
    last = 2**63 - 1 - positions
    blv_cross_entropy(logits, target, class_counts=counts, seed=1, offset=last, ignore_index=255)
    with pytest.raises(ValueError, match="offset must be in"):
        blv_cross_entropy(logits, target, class_counts=counts, seed=1, offset=last + 1, ignore_index=255)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_weights_are_constants_on_every_backend(backend, rng):
    backend = _backend(backend)
    logits, target, counts = _batch(rng)
    weight = (torch.rand(6, generator=rng) + 0.5).requires_grad_(True)
    position_weight = torch.rand(target.shape, generator=rng).requires_grad_(True)
    with pytest.raises(ValueError, match="weight requires grad"):
        blv_cross_entropy(logits, target, weight, class_counts=counts, ignore_index=255, backend=backend)
    with pytest.raises(ValueError, match="position_weight requires grad"):
        blv_cross_entropy(logits, target, class_counts=counts, ignore_index=255, position_weight=position_weight,
                          backend=backend)  # fmt: skip


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nan_position_weight_at_an_ignored_position_is_nan_everywhere(backend, rng):
    # the loss multiplies every position's loss by its weight, 0 * NaN included (as mmseg does)
    backend = _backend(backend)
    logits, target, counts = _batch(rng)
    target[0, 0, 0] = 255
    position_weight = torch.rand(target.shape, generator=rng)
    position_weight[0, 0, 0] = float("nan")
    x = logits.clone().requires_grad_(True)
    loss = blv_cross_entropy(x, target, class_counts=counts, seed=2, ignore_index=255, position_weight=position_weight,
                             reduction="sum", backend=backend)  # fmt: skip
    assert torch.isnan(loss)
    loss.backward()
    assert torch.isfinite(x.grad).all()  # an ignored position contributes no gradient


def test_cross_entropy_style_calls(rng):
    logits, target, counts = _batch(rng)
    weight = torch.rand(6, generator=rng) + 0.5
    with pytest.raises(TypeError, match="class_counts"):  # F.cross_entropy(x, y, weight) habits: counts are a keyword
        blv_cross_entropy(logits, target, weight)
    # the weight is F.cross_entropy's third positional argument
    got = blv_cross_entropy(logits, target.long(), weight, class_counts=counts, sigma=0.0, ignore_index=255,
                            label_smoothing=0.2, backend="reference")  # fmt: skip
    expected = F.cross_entropy(logits, target.long(), weight, ignore_index=255, label_smoothing=0.2)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_eval_with_class_weights_in_any_dtype(dtype, rng):
    logits, target, counts = _batch(rng)
    weight = torch.rand(6, generator=rng) + 0.5
    loss_fn = BLVLoss(counts, weight=weight, ignore_index=255).eval()
    expected = F.cross_entropy(logits.to(dtype), target.long(), weight.to(dtype), ignore_index=255)
    assert torch.equal(loss_fn(logits.to(dtype), target), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("extra", ["avg_factor", "position_weight"])
def test_eval_of_half_logits_sums_and_divides_in_float32(dtype, extra, rng):
    # 1 x 5 x 200 x 200: the sum of 40000 position losses passes float16's 65504, and so does an
    # avg_factor of 1e5 (eval returned inf and 0): eval's plain loss is training's at sigma = 0
    logits = torch.randn(1, 5, 200, 200, generator=rng).to(dtype)
    target = torch.randint(0, 5, (1, 200, 200), generator=rng)
    options = {"avg_factor": 1e5} if extra == "avg_factor" else {"position_weight": torch.ones(1, 200, 200)}
    loss_fn = BLVLoss([1, 2, 3, 4, 5], sigma=0.0, backend="reference")
    expected = loss_fn(logits, target, **options)
    got = loss_fn.eval()(logits, target, **options)
    assert got.dtype == dtype and torch.isfinite(got) and got != 0
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("extra", ["", "avg_factor", "position_weight"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_eval_under_autocast_is_float32_as_f_cross_entropy(dtype, extra, reduction, rng):
    # the plain loss of eval() under autocast: F.cross_entropy's float32 (every path, not only the
    # one that calls it directly), the value training's at sigma = 0 gives there
    logits, target, counts = _batch(rng)
    logits = logits.to(dtype)
    options = {"avg_factor": 7.0} if extra == "avg_factor" else {}
    if extra == "position_weight":
        options["position_weight"] = torch.rand(target.shape, generator=rng)
    if reduction != "mean":
        options.pop("avg_factor", None)
    loss_fn = BLVLoss(counts, sigma=0.0, ignore_index=255, reduction=reduction, backend="reference")
    with torch.autocast("cpu", dtype=dtype):
        training = loss_fn(logits, target, **options)
        got = loss_fn.eval()(logits, target, **options)
        plain = F.cross_entropy(logits, target.long(), ignore_index=255, reduction=reduction)
    assert got.dtype == training.dtype == plain.dtype == torch.float32
    torch.testing.assert_close(got, training)
    if not extra:
        torch.testing.assert_close(got, plain)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_functional_form_compiles_with_a_list_of_counts(backend, rng):
    backend = _backend(backend)
    logits, target, counts = _batch(rng)

    def loss(x):
        return blv_cross_entropy(x, target, class_counts=counts, seed=4, ignore_index=255, backend=backend)

    torch.testing.assert_close(torch.compile(loss, fullgraph=True, backend="aot_eager")(logits), loss(logits))
