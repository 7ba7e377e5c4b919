"""Every fused backend against the reference on the shared grid (tests/grid.py), plus the
backend table: resolution, errors, and what ``backend="auto"`` picks."""

import dataclasses
import math

import pytest
import torch
from grid import (
    CASES,
    DEVICE,
    HAS_CUDA,
    Case,
    Inputs,
    assert_as_close_as_reference,
    case_loss,
    check_matches_reference,
    loss_and_grad,
    make_inputs,
)

from blv_kernels import backends, blv_cross_entropy, noise
from blv_kernels.backends import BACKENDS, resolve_backend

FUSED = [name for name, backend in BACKENDS.items() if backend.fused]


def skip_unless_runs(backend: str, dtype: torch.dtype = torch.float32, device: str = DEVICE) -> None:
    error = BACKENDS[backend].why_not(torch.device(device).type, dtype)
    if error is not None:
        pytest.skip(str(error))


@pytest.mark.parametrize("case", [c.param() for c in CASES])
@pytest.mark.parametrize("backend", FUSED)
def test_matches_reference(backend, case, rng, poisoned):
    skip_unless_runs(backend, case.dtype)
    check_matches_reference(backend, case, rng)


@pytest.mark.parametrize("case", [c.param() for c in CASES if c.label_smoothing and c.shape[1] > 384])
@pytest.mark.parametrize("backend", FUSED)
def test_loss_without_grad_matches_reference(backend, case, rng, poisoned):
    # No gradient wanted: the kernels skip it, but Triton's two sweeps (above 384 classes) still
    # run the second one for the label-smoothing sum, which the grid only sees with a gradient.
    skip_unless_runs(backend, case.dtype)
    inputs = make_inputs(case, rng)
    inputs.target[(0,) * inputs.target.dim()] = 1  # a label at least: with every one ignored, "mean" is 0 / 0
    seed = int(torch.randint(0, 2**62, (), generator=rng))
    with torch.no_grad():
        ours, ref = (case_loss(name, case, inputs, seed, inputs.logits) for name in (backend, "reference"))
    assert case.dtype == torch.float32  # float32: within 1e-5, as the grid
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_auto_picks_triton_on_cuda_and_the_cpu_kernel_on_the_cpu():
    # on the CPU not Triton, even where its interpreter runs (test_csrc.py: every half dtype, and
    # the reference when the kernel cannot be built)
    expected = "triton" if HAS_CUDA else "cpu"
    skip_unless_runs(expected)
    x = torch.randn(2, 3, device=DEVICE)
    assert resolve_backend("auto", x).name == expected
    assert resolve_backend("auto", x.double()).name == "reference"


@pytest.mark.parametrize(
    "shape, channels_last, wide_rows",
    [((4, 321), False, True), ((4, 320), False, False), ((2, 321, 3, 3), False, False),
     ((2, 321, 3, 3), True, True), ((2, 321, 1, 1), False, True)],
    ids=["rows-321", "rows-320", "nchw-321", "channels_last-321", "nchw-1x1-321"],
)  # fmt: skip
def test_auto_puts_cuda_cpp_first_where_the_classes_are_contiguous_and_many(shape, channels_last, wide_rows,
                                                                           monkeypatch):  # fmt: skip
    # the measured rule (backends.AUTO_ORDER's comment), on any machine: both fused backends made
    # available for CPU tensors, which auto then orders as it orders CUDA tensors
    for name in ("triton", "cuda"):
        runs_here = dataclasses.replace(BACKENDS[name], device_types=("cpu",), unavailable=lambda device_type: None)
        monkeypatch.setitem(BACKENDS, name, runs_here)
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", backends.AUTO_ORDER["cuda"])
    monkeypatch.setitem(backends.AUTO_ORDER_WIDE_ROWS, "cpu", backends.AUTO_ORDER_WIDE_ROWS["cuda"])
    x = torch.randn(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    assert resolve_backend("auto", x).name == ("cuda" if wide_rows else "triton")


def test_auto_picks_cuda_cpp_for_many_contiguous_classes_on_cuda():
    skip_unless_runs("cuda", device="cuda" if HAS_CUDA else "cpu")
    assert resolve_backend("auto", torch.randn(64, 1000, device="cuda")).name == "cuda"
    assert resolve_backend("auto", torch.randn(2, 1000, 3, 3, device="cuda")).name == "triton"


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="backend must be one of"):
        blv_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), class_counts=[1, 2, 3], backend="fast")


# ------------------------------------------------------------------ behaviour every fused backend shares


@pytest.fixture(params=FUSED)
def fused(request) -> str:
    skip_unless_runs(request.param)
    return request.param


def _loss_grad(backend, x, target, counts, *, grad_out=None, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    loss = blv_cross_entropy(x, target, class_counts=counts, backend=backend, **kwargs)
    (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss) if grad_out is None else grad_out)
    return loss, grad


@pytest.mark.parametrize("shift", [2.0**13, -(2.0**13)], ids=["plus", "minus"])
@pytest.mark.parametrize("sigma", [0.0, 6.0])
@pytest.mark.parametrize("backend", [*FUSED, "reference"])
def test_a_constant_added_to_the_logits_changes_nothing(backend, shift, sigma, rng):
    # F.cross_entropy is shift invariant, so must every backend be: exp(z - m) formed from z - m
    # (not z log2(e) - m log2(e), which loses an ulp of |z| log2(e); nor exp(z) without m), the
    # logsumexp kept as (m, log d). The logits are multiples of 2**-10 below 32 in magnitude, so
    # x + shift is exact in float32 (its ulp at 2**13 is 2**-10): f(x + shift) against f(x), same seed.
    if backend != "reference":
        skip_unless_runs(backend)
    x = ((torch.randn(6, 19, 4, generator=rng) * 4).clamp(-31, 31) * 2**10).round() / 2**10
    target = torch.randint(0, 19, (6, 4), generator=rng)
    x, target, counts = x.to(DEVICE), target.to(DEVICE), list(range(1, 20))
    assert torch.equal(x + shift - shift, x)
    base = _loss_grad(backend, x, target, counts, sigma=sigma, seed=3, reduction="none")
    shifted = _loss_grad(backend, x + shift, target, counts, sigma=sigma, seed=3, reduction="none")
    if sigma == 0:
        # z - m is exact on both sides (Sterbenz with the shift; without it a difference of multiples of 2**-10
        # below 64): the same exponents, only float32 rounding of the rest (a few ulps) apart
        tolerance = dict(rtol=1e-6, atol=1e-6)
    else:
        # z = x + shift + v*w rounds to half an ulp of 2**13, 2**-11 (without the shift 2**-19 at
        # |z| < 64): lse - z_t moves by at most twice that, p_c by p_c (exp(2 dz) - 1) <= 2.01 dz
        dz = 2**-11 + 2**-19
        tolerance = dict(rtol=1e-5, atol=2.01 * dz + 1e-5)  # + float32 evaluation, as the grid
    torch.testing.assert_close(shifted[0], base[0], **tolerance)
    torch.testing.assert_close(shifted[1], base[1], **tolerance)


@pytest.mark.parametrize("sigma", [0.0, 6.0])
def test_logits_that_round_to_one_value_give_a_uniform_softmax(fused, sigma, rng):
    # x + 1e30 rounds every logit, and z = x + v*w, to 1e30 (float32 spacing there ~ 7e22): softmax
    # 1/C, loss log(C), as F.cross_entropy gives; exp never sees 1e30 itself
    x = (torch.randn(6, 19, 4, generator=rng) + 1e30).to(DEVICE)
    target = torch.randint(0, 19, (6, 4), generator=rng).to(DEVICE)
    loss, grad = _loss_grad(fused, x, target, list(range(1, 20)), sigma=sigma, seed=3, reduction="none")
    torch.testing.assert_close(loss, torch.full_like(loss, math.log(19)))
    expected = torch.full_like(grad, 1 / 19) - torch.nn.functional.one_hot(target, 19).permute(0, 2, 1)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("mode", ["abs", "clamp"])
def test_largest_sigma_matches_the_reference_where_eps_is_zero(fused, mode, rng):
    # position 10460476 of seed 1 draws t = 0 for class 3: v = 0 there on every backend (above
    # SIGMA_MAX, refused now, the reference gave NaN and the fused kernels 1)
    x = torch.randn(1, 4, 3, generator=rng).to(DEVICE)
    target = torch.randint(0, 4, (1, 3), generator=rng).to(DEVICE)
    options = dict(sigma=noise.SIGMA_MAX, seed=1, offset=10460476, mode=mode, reduction="none")
    loss, grad = _loss_grad(fused, x, target, [8, 4, 2, 1], **options)
    expected_loss, expected_grad = _loss_grad("reference", x, target, [8, 4, 2, 1], **options)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad)


def test_layout_does_not_change_the_result(fused, rng):
    x = torch.randn(2, 19, 5, 6, generator=rng).to(DEVICE)
    wide = torch.zeros(2, 38, 5, 6, device=DEVICE)
    wide[:, ::2] = x
    target = torch.randint(0, 19, (2, 5, 6), generator=rng).to(DEVICE)
    counts = list(range(1, 20))
    base = _loss_grad(fused, x, target, counts, seed=3, reduction="none")
    for view in (x.to(memory_format=torch.channels_last), wide[:, ::2]):
        loss, grad = _loss_grad(fused, view, target, counts, seed=3, reduction="none")
        torch.testing.assert_close(loss, base[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, base[1], rtol=1e-6, atol=1e-7)


def test_deterministic_and_seeded(fused, rng):
    x = torch.randn(2, 19, 6, 7, generator=rng).to(DEVICE)
    target = torch.randint(0, 19, (2, 6, 7), generator=rng).to(DEVICE)
    counts = list(range(1, 20))
    first, second = (_loss_grad(fused, x, target, counts, seed=11) for _ in range(2))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], _loss_grad(fused, x, target, counts, seed=12)[0])


def test_expanded_grad_output(fused, rng):
    x = torch.randn(2, 7, 3, 4, generator=rng).to(DEVICE)
    target = torch.randint(0, 7, (2, 3, 4), generator=rng).to(DEVICE)
    grad_out = torch.randn((), generator=rng).to(DEVICE).expand(target.shape)  # stride 0 everywhere
    ours = _loss_grad(fused, x, target, list(range(1, 8)), grad_out=grad_out, seed=5, reduction="none")
    ref = _loss_grad("reference", x, target, list(range(1, 8)), grad_out=grad_out, seed=5, reduction="none")
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-5, atol=1e-6)


def test_confident_bf16_predictions_keep_their_gradient(fused, rng):
    # target logit = max + 10: p_t = 1 - O(1e-4); the true-class term p_t - 1 must not cancel to 0.
    skip_unless_runs(fused, torch.bfloat16)
    x = torch.randn(64, 19, generator=rng)
    target = torch.randint(0, 19, (64,), generator=rng)
    x[torch.arange(64), target] = x.max(dim=1).values + 10
    x, target = x.to(DEVICE, torch.bfloat16), target.to(DEVICE)
    counts = list(range(1, 20))
    gt = _loss_grad("reference", x.double(), target, counts, sigma=0.0, reduction="sum")[1]
    ours = _loss_grad(fused, x, target, counts, sigma=0.0, reduction="sum")[1]
    at_target = lambda g: g[torch.arange(64), target].double()
    assert (at_target(ours) < 0).all()
    # p_t - 1 ~ -1e-4. Formed in bf16 it would be 0 or -2**-8 (an error of 1e-4 or more); in
    # fp32 its error is that of z_t - lse, a few fp32 ulps at the logits' magnitude (exp turns
    # the absolute error of its argument into a relative error of p), plus the bf16 rounding.
    atol = 4 * torch.finfo(torch.float32).eps * x.float().abs().max().item()
    torch.testing.assert_close(at_target(ours), at_target(gt), rtol=2**-8, atol=atol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(64, 5), (2, 5, 32), (4, 67)], ids=["rows", "NCS", "rows-C67"])
def test_half_logits_take_the_shift_in_float32(fused, shape, dtype, rng):
    # Logits near 256 are 2 apart in bf16 (0.25 in fp16): a shift v*w in [0, 1] rounded back to the
    # logits' dtype before the softmax would move z by up to 1 (0.125), some 50 (20) times the
    # tolerance. The semantics (test_reference.py): z and the softmax in float32, the results
    # rounded once. The shapes reach the CPU kernel's narrow and wide tiles and its rows path.
    skip_unless_runs(fused, dtype)
    c = shape[1]
    case = Case(shape, dtype=dtype, reduction="none")
    target = torch.randint(0, c, shape[:1] + shape[2:], generator=rng)
    logits = (torch.randn(shape, generator=rng) + 256).to(dtype)
    counts = torch.randint(1, 10**4, (c,), generator=rng)  # variation weights over [0, 1]
    inputs = Inputs(logits.to(DEVICE), target.to(DEVICE), counts, None, None, -100)
    seed = int(torch.randint(0, 2**62, (), generator=rng))
    grad_out = torch.ones(target.shape, device=DEVICE)
    truncates = fused == "triton" and DEVICE == "cpu" and dtype == torch.bfloat16  # as in grid.check_matches_reference
    assert_as_close_as_reference(
        dtype, loss_and_grad(fused, case, inputs, seed, grad_out), loss_and_grad("reference", case, inputs, seed, grad_out),
        lambda: loss_and_grad("reference", case, inputs, seed, grad_out.double(), inputs.logits.double()),
        ulps=1.0 if truncates else 0.5,
    )  # fmt: skip


def test_nan_and_inf_propagate_like_pytorch(fused):
    x = torch.randn(6, 5)
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    x[0, 2] = float("inf")  # +inf logit: NaN loss and gradient, as in PyTorch
    x[1, 3] = float("-inf")  # -inf in another class: probability 0
    x[2, 2] = float("-inf")  # -inf at the target: infinite loss
    x[3, 0] = float("nan")  # NaN anywhere: NaN
    x, target = x.to(DEVICE), target.to(DEVICE)
    for sigma in (0.0, 6.0):
        ours = _loss_grad(fused, x, target, [5, 4, 3, 2, 1], sigma=sigma, seed=2, reduction="none")
        ref = _loss_grad("reference", x, target, [5, 4, 3, 2, 1], sigma=sigma, seed=2, reduction="none")
        torch.testing.assert_close(ours[0], ref[0], equal_nan=True)
        torch.testing.assert_close(ours[1], ref[1], equal_nan=True)
    plain = torch.nn.functional.cross_entropy(x, target, reduction="none")
    torch.testing.assert_close(ours[0].isnan(), plain.isnan())


@pytest.mark.parametrize("shape, channels_last", [((3, 5, 2, 2), False), ((3, 40, 2, 2), True), ((12, 40), False)],
                         ids=["NCHW-C5", "channels_last-C40", "rows-C40"])  # fmt: skip
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_logits_at_ignored_positions_are_ignored(fused, shape, channels_last, bad, rng):
    # F.cross_entropy leaves an ignored position out of the loss, whatever its logits: so does every
    # backend, in every reduction (0 * NaN would make the sum NaN). The gradient is compared away from
    # those positions: there it is NaN on the reference (autograd's 0 * NaN, as F.cross_entropy's)
    # and may be 0 on a fused backend.
    x = torch.randn(shape, generator=rng)
    target = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=rng)
    ignored = torch.zeros(target.shape, dtype=torch.bool)
    ignored.view(-1)[1::4] = True
    target[ignored] = 255
    x.movedim(1, -1)[ignored] = torch.where(torch.rand(ignored.sum(), shape[1], generator=rng) < 0.5, bad, 1.0)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x, target, counts = x.to(DEVICE), target.to(DEVICE), list(range(1, shape[1] + 1))
    for reduction in ("none", "sum", "mean"):
        ours = _loss_grad(fused, x, target, counts, sigma=6.0, seed=3, ignore_index=255, reduction=reduction)
        ref = _loss_grad("reference", x, target, counts, sigma=6.0, seed=3, ignore_index=255, reduction=reduction)
        assert ours[0].isfinite().all(), reduction
        torch.testing.assert_close(ours[0], ref[0], msg=reduction)
        kept = ~ignored.to(DEVICE)
        torch.testing.assert_close(ours[1].movedim(1, -1)[kept], ref[1].movedim(1, -1)[kept], msg=reduction)
    plain = torch.nn.functional.cross_entropy(x, target, ignore_index=255, reduction="none")
    torch.testing.assert_close(plain[ignored.to(DEVICE)], torch.zeros(ignored.sum().item(), device=DEVICE))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_grad_output_at_an_ignored_position_is_ignored(fused, bad, rng):
    # F.cross_entropy's gradient at an ignored position is 0 whatever its grad_output, as the
    # reference's: loss.sqrt() of reduction "none" has an infinite derivative there (the loss is 0),
    # and 0 * inf = NaN would poison every weight of the network.
    x = torch.randn(3, 6, 4, 5, generator=rng)
    target = torch.randint(0, 6, (3, 4, 5), generator=rng)
    target.view(-1)[1::3] = 255
    grad_out = torch.where(target == 255, bad, torch.randn(target.shape, generator=rng))
    x, target, grad_out, counts = x.to(DEVICE), target.to(DEVICE), grad_out.to(DEVICE), [4, 9, 1, 7, 2, 5]
    ours = _loss_grad(fused, x, target, counts, grad_out=grad_out, sigma=6.0, seed=4, ignore_index=255,
                      reduction="none")  # fmt: skip
    ref = _loss_grad("reference", x, target, counts, grad_out=grad_out, sigma=6.0, seed=4, ignore_index=255,
                     reduction="none")  # fmt: skip
    assert ours[1].movedim(1, -1)[target == 255].eq(0).all()
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-5, atol=1e-6)
    plain = torch.randn(3, 6, 4, 5, device=DEVICE, requires_grad=True)
    torch.nn.functional.cross_entropy(plain, target, ignore_index=255, reduction="none").sqrt().sum().backward()
    assert plain.grad.movedim(1, -1)[target == 255].eq(0).all()


@pytest.mark.parametrize("shape", [(2, 5, 3, 3), (6, 40)], ids=["NCHW", "rows-C40"])
@pytest.mark.parametrize("weights", ["inf", "overflowing-sum"])
def test_class_weights_of_classes_no_label_has_change_nothing_without_smoothing(fused, shape, weights, rng):
    # F.cross_entropy reads cw_t of the labels only: an infinite weight of another class, or weights
    # whose sum overflows float32, leave the loss and gradient finite (W = sum cw_c enters only
    # with label smoothing; the CPU kernel multiplied it by 0: NaN)
    x = torch.randn(shape, generator=rng).to(DEVICE)
    target = torch.randint(0, 3, shape[:1] + shape[2:], generator=rng).to(DEVICE)  # classes 3 and up: no label
    big = float("inf") if weights == "inf" else 2e38
    weight = torch.tensor([1.0, 2.0, 0.5] + [big] * (shape[1] - 3)).to(DEVICE)
    counts = list(range(1, shape[1] + 1))
    ours = _loss_grad(fused, x, target, counts, weight=weight, sigma=0.0)
    plain = x.detach().clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(plain, target, weight)
    loss.backward()
    assert ours[1].isfinite().all()
    torch.testing.assert_close(ours, (loss, plain.grad), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_a_mean_over_labels_that_all_weigh_0_is_nan_as_pytorchs(fused, label_smoothing, rng):
    # "mean" divides by the labels' summed class weights, here 0: F.cross_entropy gives NaN, smoothing or
    # not ((1-eps) 0/0 + (eps/C) x/0); the fused total / 0 was x / 0 = inf with smoothing
    x = torch.randn(4, 5, 3, generator=rng).to(DEVICE)
    target = torch.tensor([[0, 3, -100], [0, 0, 3], [-100, 3, 3], [0, 0, 0]]).to(DEVICE)
    weight = torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0]).to(DEVICE)
    ours = blv_cross_entropy(x, target, weight, class_counts=[1, 2, 3, 4, 5], sigma=0.0, label_smoothing=label_smoothing,
                             backend=fused)  # fmt: skip
    plain = torch.nn.functional.cross_entropy(x, target, weight, label_smoothing=label_smoothing)
    assert plain.isnan() and ours.isnan()


def test_uint8_labels_beside_ignore_index_minus_100_keep_their_gradient(fused, rng):
    # -100 is 156 as a uint8: a class of COCO-Stuff's 171, which F.cross_entropy (and every backend)
    # counts; no step of the loss or its backward may compare the labels in their own dtype
    x = torch.randn(5, 171, generator=rng).to(DEVICE)
    target = torch.tensor([156, 3, 170, 156, 0], dtype=torch.uint8).to(DEVICE)
    grad_out = torch.rand(5, generator=rng).to(DEVICE) + 0.5
    counts = list(range(1, 172))
    ours = _loss_grad(fused, x, target, counts, grad_out=grad_out, sigma=6.0, seed=6, reduction="none")
    ref = _loss_grad("reference", x, target, counts, grad_out=grad_out, sigma=6.0, seed=6, reduction="none")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert ours[1][0].abs().sum() > 1  # the row of label 156 has p_t - 1 at its label


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("backend", [*FUSED, "reference"])
def test_under_autocast_the_loss_is_float32_as_f_cross_entropys(backend, reduction, dtype, rng):
    # F.cross_entropy is on autocast's float32 list: under autocast its loss of half logits is
    # float32. So is BLV's: the same float32 value, not rounded to half (which would round the logged
    # loss, overflow a float16 sum and take GradScaler's 2**16 as inf); the gradient is unchanged.
    skip_unless_runs(backend, dtype)
    x = (torch.randn(2, 7, 3, 5, generator=rng) * 3).to(DEVICE, dtype)
    target = torch.randint(0, 7, (2, 3, 5), generator=rng)
    target[0, 0] = 255
    target = target.to(DEVICE)
    # (for "none", a grad_output that half holds exactly: the plain loss's would be rounded to half)
    grad_out = None if reduction != "none" else torch.rand(2, 3, 5, generator=rng).to(DEVICE, dtype).float()
    kwargs = dict(sigma=6.0, seed=5, ignore_index=255, reduction=reduction)
    plain = _loss_grad(backend, x, target, [9, 7, 5, 3, 2, 1, 1], grad_out=grad_out, **kwargs)
    with torch.autocast(DEVICE, dtype=dtype):
        autocast = _loss_grad(backend, x, target, [9, 7, 5, 3, 2, 1, 1], grad_out=grad_out, **kwargs)
        assert (
            torch.nn.functional.cross_entropy(x, target, ignore_index=255, reduction=reduction).dtype == torch.float32
        )
    assert plain[0].dtype == dtype and autocast[0].dtype == torch.float32 and autocast[1].dtype == dtype
    rounded = autocast[0].to(dtype)
    if backend == "triton" and DEVICE == "cpu" and dtype == torch.bfloat16 and reduction == "none":
        # the interpreter's kernel stores float32 -> bfloat16 truncated (GPUs round to nearest)
        rounded = (autocast[0].view(torch.int32) & -(2**16)).view(torch.float32).to(dtype)
    torch.testing.assert_close(rounded, plain[0], rtol=0, atol=0)
    assert (autocast[0] != plain[0].float()).any()  # not the half value, widened
    torch.testing.assert_close(autocast[1], plain[1], rtol=0, atol=0)


def test_minus_inf_classes_before_finite_ones(fused, rng):
    # -inf logits (masked classes) filling the first chunks, finite ones after them
    x = torch.randn(4, 100, generator=rng)
    x[:, :64] = float("-inf")
    target = torch.randint(64, 100, (4,), generator=rng)
    loss, _ = _loss_grad(fused, x.to(DEVICE), target.to(DEVICE), [1] * 100, sigma=0.0, reduction="none")
    torch.testing.assert_close(loss.cpu(), torch.nn.functional.cross_entropy(x, target, reduction="none"))


@pytest.mark.parametrize("view", ["batch", "cropped"])  # cropped: no elements, positions no strided run
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_empty_batch(fused, reduction, view):
    if view == "batch":
        x = torch.randn(0, 5, 3, device=DEVICE, requires_grad=True)
    else:  # (its layout once had no spatial stride: a TypeError)
        x = torch.randn(2, 5, 4, 6, device=DEVICE)[:, :, :0, ::2].requires_grad_(True)
    target = torch.zeros(x.shape[:1] + x.shape[2:], dtype=torch.int64, device=DEVICE)
    loss = blv_cross_entropy(x, target, class_counts=[1, 2, 3, 4, 5], reduction=reduction, backend=fused)
    expected = torch.nn.functional.cross_entropy(x, target, reduction=reduction)
    torch.testing.assert_close(loss, expected, equal_nan=True)
    loss.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.skipif(HAS_CUDA, reason="the CPU raises at once; on a GPU it is a device-side assert")
@pytest.mark.parametrize("bad", [19, -1, 200, 2**40], ids=["C", "negative", "uint8-200", "beyond-int32"])
def test_out_of_range_label_raises(fused, bad, rng):
    x = torch.randn(2, 19, 3, 4, generator=rng)
    target = torch.randint(0, 19, (2, 3, 4), generator=rng)
    target[1, 2, 3] = bad
    if bad == 200:
        target = target.to(torch.uint8)
    with pytest.raises(ValueError, match=rf"outside \[0, 19\).*first: {bad}"):
        blv_cross_entropy(x, target, class_counts=list(range(1, 20)), ignore_index=255, seed=1, backend=fused)


def test_backend_errors():
    x = torch.randn(2, 3, dtype=torch.float64, device=DEVICE)
    t = torch.tensor([0, 1], device=DEVICE)
    for name in FUSED:
        if DEVICE in BACKENDS[name].device_types:
            with pytest.raises(TypeError, match="float64"):
                blv_cross_entropy(x, t, class_counts=[1, 2, 3], backend=name)
        else:
            with pytest.raises(ValueError, match=f"needs {BACKENDS[name].device_types[0]} tensors"):
                blv_cross_entropy(x.float(), t, class_counts=[1, 2, 3], backend=name)
    with pytest.raises(ValueError, match="variation="):
        blv_cross_entropy(x.float(), t, class_counts=[1, 2, 3], variation=torch.rand(2, 3), backend=FUSED[0])


@pytest.mark.skipif(not HAS_CUDA, reason="full-size shapes need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape, layout", [((8, 19, 512, 1024), "contiguous"), ((2, 150, 512, 512), "contiguous"),
                                           ((2, 150, 512, 512), "channels_last"), ((65536, 1000), "contiguous")],
                         ids=["N8-C19-512x1024", "N2-C150-512x512", "N2-C150-512x512-cl", "N65536-C1000"])  # fmt: skip
def test_full_size_on_gpu(fused, shape, layout, dtype, rng):
    case = Case(shape, layout=layout, dtype=dtype, ignore=0.1)
    inputs = make_inputs(case, rng)
    ours = _loss_grad(fused, inputs.logits, inputs.target, inputs.counts, seed=9)
    ref = _loss_grad("reference", inputs.logits, inputs.target, inputs.counts, seed=9)
    if dtype != torch.float32:  # the grid's rule: no further from a float64 ground truth than the reference
        logits64 = inputs.logits.double()
        assert_as_close_as_reference(
            dtype, ours, ref, lambda: _loss_grad("reference", logits64, inputs.target, inputs.counts, seed=9)
        )
        return
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-5)
    # "mean" over V valid positions (millions): each gradient element is (p_c - [c == t]) / V. The
    # grid's absolute 1e-6 exceeds 1/V here and would check nothing; so an absolute term at the
    # gradient's scale. Float32 moves z - lse by a few ulps of |z| < 32 (each ulp 2**-19, 2e-6),
    # p_c by that relative (rtol 1e-5) and p_t - 1, near 0 for a confident class, by that absolute.
    scale = 1 / (inputs.target != inputs.ignore_index).sum().item()
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.skipif(not HAS_CUDA, reason="a tensor of more than 2**31 elements needs a GPU's memory")
def test_more_than_2_31_elements_on_gpu(fused):
    # (1, 4, 2**29 + 7) fp16: 2**31 + 28 elements, so element offsets overflow int32. The
    # stream is defined per position, so the last positions must equal the reference on a
    # slice of them evaluated at the matching offset.
    size = 2**29 + 7
    x = torch.randn(1, 4, size, device="cuda", dtype=torch.float16)
    target = torch.randint(0, 4, (1, size), device="cuda")
    counts = [10, 20, 30, 40]
    loss, grad = _loss_grad(fused, x, target, counts, seed=4, reduction="none")
    tail = 1000
    ref_loss, ref_grad = _loss_grad("reference", x[:, :, -tail:].float(), target[:, -tail:], counts, seed=4,
                                    offset=size - tail, reduction="none")  # fmt: skip
    torch.testing.assert_close(loss[:, -tail:].float(), ref_loss, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(grad[:, :, -tail:].float(), ref_grad, rtol=2e-3, atol=1e-3)
