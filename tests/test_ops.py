"""The operator contract (blv_kernels/ops.py), for every fused backend: opcheck, the gradient
computed in the forward and scaled in place by the backward, torch.compile(fullgraph=True) with
a sigma schedule that compiles nothing, CUDA graphs that replay the new sigma, and clear errors
for what the fused backends do not support."""

import pytest
import torch
import torch._dynamo.testing
import torch._inductor.config
from grid import DEVICE, HAS_CUDA
from test_backends import FUSED, skip_unless_runs
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from blv_kernels import BLVLoss, blv_cross_entropy, blv_cross_entropy_from_weights, noise, ops
from blv_kernels.backends import get_backend
from blv_kernels.problem import BLVProblem


@pytest.fixture(params=FUSED)
def fused(request) -> str:
    skip_unless_runs(request.param)
    return request.param


def _op_args(rng, backend, reduction, *, weights=False, compute_grad=True):
    x = torch.randn(2, 7, 3, 5, generator=rng).to(DEVICE).requires_grad_(True)
    target = torch.randint(0, 7, (2, 3, 5), generator=rng).to(DEVICE)
    target[0, 0, 0] = -100
    cw = (torch.rand(7, generator=rng) + 0.5).to(DEVICE) if weights else None
    pw = (torch.rand(2, 3, 5, generator=rng) + 0.5).to(DEVICE) if weights else None
    seed = noise.seed_tensor(int(torch.randint(0, 2**62, (), generator=rng)), DEVICE)
    return (x, target, torch.rand(7, generator=rng).to(DEVICE), cw, pw, seed, noise.variation_params_tensor(6.0, DEVICE),
            None, 17, -100, reduction, "abs", 0.1 if weights else 0.0, x.dtype, compute_grad, backend)  # fmt: skip


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("weights", [False, True], ids=["", "weights"])
def test_opcheck(fused, reduction, weights, rng):
    torch.library.opcheck(ops.fused_blv_cross_entropy, _op_args(rng, fused, reduction, weights=weights))


_ARG = {name: i for i, name in enumerate(ops._ARGUMENTS)}


@pytest.mark.parametrize(
    "name, value, error, match",
    [
        ("variation_weight", torch.ones(1), ValueError, r"variation weight must have shape \(7,\)"),
        (
            "variation_weight",
            torch.ones(7, dtype=torch.float64),
            TypeError,
            "variation weight must be a contiguous float32",
        ),
        ("class_weight", torch.ones(14)[::2], TypeError, "weight must be a contiguous float32"),
        ("target", torch.zeros(1, dtype=torch.long), ValueError, "target shape"),
        ("position_weight", torch.ones(2), ValueError, "position_weight shape"),
        ("seed", torch.ones(2, dtype=torch.long), TypeError, "seed must be a 0-dim torch.int64 tensor"),
        ("seed", torch.ones(()), TypeError, "seed must be a 0-dim torch.int64 tensor"),
        ("variation_params", torch.ones(3), TypeError, "variation_params must be the float32 tensor"),
        ("avg_factor", torch.ones((), dtype=torch.float64), TypeError, "avg_factor must be a 0-dim torch.float32"),
        ("offset", -5, ValueError, "offset must be in"),
        ("reduction", "avg", ValueError, "reduction must be one of"),
        ("mode", "xx", ValueError, "mode must be one of"),
        ("label_smoothing", 5.0, ValueError, "label_smoothing must be a number in"),
        (
            "loss_dtype",
            torch.float16,
            TypeError,
            "loss_dtype must be the logits' dtype .torch.float32. or torch.float32",
        ),
        ("backend", "reference", ValueError, "'reference' is not a fused backend"),
        ("logits", torch.randn(2, 7, 3, 5, dtype=torch.float64), TypeError, "float64: use backend='reference'"),
    ],
    ids=lambda x: x if isinstance(x, str) and " " not in x else None,
)
def test_direct_calls_of_the_op_are_checked(fused, name, value, error, match, rng):
    """The op is public: a bad argument is named before any kernel reads out of bounds (in the op
    itself, which a compiled graph calls with concrete values; its fake checks nothing)."""
    args = list(_op_args(rng, fused, "mean", weights=True))
    args[_ARG[name]] = value.to(DEVICE) if isinstance(value, torch.Tensor) else value
    with pytest.raises(error, match=match):
        ops.fused_blv_cross_entropy(*args)


def test_no_gradient_is_written_without_autograd(fused, rng):
    args = _op_args(rng, fused, "mean", compute_grad=False)
    loss, grad = ops.fused_blv_cross_entropy(*args)
    assert grad.numel() == 0 and torch.isfinite(loss)
    with pytest.raises(RuntimeError, match="called with compute_grad=False, so it computed no gradient"):
        loss.backward()  # (the logits require grad: autograd asks, and gets the reason, not a shape error)
    with torch.no_grad():  # the public entry asks for no gradient either
        assert torch.equal(blv_cross_entropy(args[0], args[1], class_counts=list(range(1, 8)), seed=3, backend=fused),
                           blv_cross_entropy(args[0].detach(), args[1], class_counts=list(range(1, 8)), seed=3,
                                             backend=fused))  # fmt: skip


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_eager_calls_skip_the_ops_dispatch_and_match_it(fused, reduction, rng):
    # eager: _EagerFusedLoss, the op's forward and backward without its dispatch; bit for bit the op's results
    args = _op_args(rng, fused, reduction, weights=True)
    x, grad_out = args[0], torch.rand(args[1].shape if reduction == "none" else (), generator=rng).to(DEVICE) + 0.5
    problem = BLVProblem(*(a.detach().requires_grad_() if a is x else a for a in args[:-2]))
    eager = ops.fused_loss(problem, fused)
    assert type(eager.grad_fn).__name__ == "_EagerFusedLossBackward"
    (eager_grad,) = torch.autograd.grad(eager, problem.logits, grad_out)
    through_op, _ = ops.fused_blv_cross_entropy(*args)
    (op_grad,) = torch.autograd.grad(through_op, x, grad_out)
    assert torch.equal(eager, through_op) and torch.equal(eager_grad, op_grad)


class _RecordedOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_and_fake_tensors_see_the_op(fused, rng):
    # a sanitizer, a counter or make_fx must see the kernel as one call, not the backend's internals
    x = torch.randn(2, 7, 3, 5, generator=rng).to(DEVICE).requires_grad_(True)
    target = torch.randint(0, 7, (2, 3, 5), generator=rng).to(DEVICE)
    with _RecordedOps() as recorded:
        loss = blv_cross_entropy(x, target, class_counts=list(range(1, 8)), seed=3, backend=fused)
    assert "blv_kernels.fused_blv_cross_entropy.default" in recorded.ops
    assert type(loss.grad_fn).__name__ != "_EagerFusedLossBackward"
    with FakeTensorMode():  # shapes only: the class counts' checks read values, so the weights are given
        fake = blv_cross_entropy_from_weights(torch.empty(2, 7, 3, 5, device=DEVICE), torch.zeros(2, 3, 5,
                                              dtype=torch.long, device=DEVICE), torch.ones(7, device=DEVICE), seed=3,
                                              backend=fused)  # fmt: skip
    assert isinstance(fake, FakeTensor) and fake.shape == ()
    # a tensor subclass (a DTensor, say) goes through the op too, with the same result
    marked = x.detach().as_subclass(_Marked).requires_grad_(True)
    through_op = blv_cross_entropy(marked, target, class_counts=list(range(1, 8)), seed=3, backend=fused)
    assert type(through_op.grad_fn).__name__ != "_EagerFusedLossBackward"
    torch.testing.assert_close(through_op.as_subclass(torch.Tensor), loss.detach(), rtol=0, atol=0)


class _Marked(torch.Tensor):
    pass


class _LargeAllocations(TorchDispatchMode):
    """Records every aten op that returns a new tensor (not a view of an argument) of ``numel`` elements."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        }
        if any(isinstance(t, torch.Tensor) and t.numel() == self.numel and t.untyped_storage().data_ptr() not in inputs
               for t in pytree.tree_leaves(out)):  # fmt: skip
            self.ops.append(str(func))
        return out


@pytest.mark.parametrize("through", ["op", "eager"])
def test_backward_allocates_nothing_of_the_logits_size(fused, through, rng):
    # the forward's gradient is scaled in place: autograd must not zero-fill a gradient for the op's
    # gradient output (a write of the logits' size: it once doubled a CPU step's time on two threads)
    args = _op_args(rng, fused, "mean")
    x = args[0]
    if through == "op":
        loss, _ = ops.fused_blv_cross_entropy(*args)
    else:
        loss = ops.fused_loss(BLVProblem(*args[:-2]), fused)
    with _LargeAllocations(x.numel()) as recorded:
        loss.backward()
    assert recorded.ops == [] and x.grad is not None


def test_backward_hands_over_the_forward_gradient_without_a_copy(fused, rng, monkeypatch):
    # The forward's gradient buffer becomes x.grad: autograd takes it over (no copy).
    buffers = []
    x = torch.randn(2, 7, 3, 5, generator=rng).to(DEVICE).requires_grad_(True)
    target = torch.randint(0, 7, (2, 3, 5), generator=rng).to(DEVICE)
    implementation = get_backend(fused).implementation()
    forward = implementation.forward

    def recording_forward(problem, *, compute_grad):
        loss, grad = forward(problem, compute_grad=compute_grad)
        buffers.append(grad.data_ptr())
        return loss, grad

    monkeypatch.setattr(implementation, "forward", recording_forward)
    blv_cross_entropy(x, target, class_counts=list(range(1, 8)), seed=5, backend=fused).backward()
    assert x.grad.data_ptr() == buffers[0]
    ref = x.detach().clone().requires_grad_(True)
    blv_cross_entropy(ref, target, class_counts=list(range(1, 8)), seed=5, backend="reference").backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_backward_scales_by_grad_output(fused, reduction, rng):
    x = torch.randn(3, 7, 4, generator=rng).to(DEVICE)
    target = torch.randint(0, 7, (3, 4), generator=rng).to(DEVICE)
    grad_out = torch.randn(() if reduction != "none" else (3, 4), generator=rng).to(DEVICE)
    grads = []
    for backend in (fused, "reference"):
        xb = x.clone().requires_grad_(True)
        loss = blv_cross_entropy(xb, target, class_counts=list(range(1, 8)), seed=9, reduction=reduction,
                                 backend=backend)  # fmt: skip
        loss.backward(grad_out)
        grads.append(xb.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_backward_twice_double_backward_and_torch_func_are_clear_errors(fused, rng):
    x = torch.randn(2, 7, generator=rng).to(DEVICE).requires_grad_(True)
    target = torch.randint(0, 7, (2,), generator=rng).to(DEVICE)
    counts = list(range(1, 8))
    loss = blv_cross_entropy(x, target, class_counts=counts, seed=1, backend=fused)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward already ran for this forward"):
        loss.backward()
    loss = blv_cross_entropy(x, target, class_counts=counts, seed=1, backend=fused)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="torch.func"):
        torch.func.grad(lambda x: blv_cross_entropy(x, target, class_counts=counts, seed=1, backend=fused))(x.detach())
    with pytest.raises(RuntimeError, match="torch.func"):  # a transform over the labels only
        torch.func.vmap(lambda t: blv_cross_entropy(x, t, class_counts=counts, seed=1, backend=fused))(target[None])
    # the reference supports both
    g = torch.func.grad(lambda x: blv_cross_entropy(x, target, class_counts=counts, seed=1, backend="reference"))
    assert torch.isfinite(g(x.detach())).all()


class _TinySegmenter(nn.Module):
    def __init__(self, classes, backend):
        super().__init__()
        self.conv = nn.Conv2d(3, classes, 3, padding=1)
        self.loss = BLVLoss(list(range(1, classes + 1)), sigma=6.0, ignore_index=255, backend=backend)

    def forward(self, image, labels):
        return self.loss(self.conv(image), labels)


def _segmenter_batch(rng):
    image = torch.randn(2, 3, 6, 7, generator=rng).to(DEVICE)
    labels = torch.randint(0, 5, (2, 6, 7), generator=rng, dtype=torch.uint8).to(DEVICE)
    return image, labels


# inductor draws random numbers its own way unless told to fall back to eager's generator
@torch._inductor.config.patch(fallback_random=True)
def test_compile_fullgraph_matches_eager(fused, rng):
    model = _TinySegmenter(5, fused).to(DEVICE)
    image, labels = _segmenter_batch(rng)
    compiled = torch.compile(model, fullgraph=True)
    torch.manual_seed(3)
    eager = model(image, labels)
    (eager_grad,) = torch.autograd.grad(eager, model.conv.weight)
    torch.manual_seed(3)
    loss = compiled(image, labels)
    (grad,) = torch.autograd.grad(loss, model.conv.weight)
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grad, eager_grad)


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_compile_takes_changing_shapes_and_numbers(backend, dynamic, rng):
    # Recompiled after a change (or traced dynamic from the start), shapes and a number avg_factor
    # are symbolic: no argument check may branch on their values (one did: fullgraph failed)
    if backend != "reference":
        skip_unless_runs(backend)
    torch._dynamo.reset()  # the lambda below is one code object in every parametrization: its own recompile budget
    counts = torch.randint(1, 10**5, (6,), generator=rng).tolist()
    loss_fn = BLVLoss(counts, sigma=2.0, backend=backend)
    step = torch.compile(lambda x, t, a: loss_fn(x, t, seed=5, avg_factor=a), backend="aot_eager", fullgraph=True,
                         dynamic=dynamic)  # fmt: skip
    for shape, avg_factor in (((2, 6, 4, 4), 12), ((2, 6, 5, 7), 13), ((2, 6, 5, 7), 14.5)):
        x = torch.randn(shape, generator=rng)
        t = torch.randint(0, 6, shape[:1] + shape[2:], generator=rng)
        torch.testing.assert_close(step(x, t, avg_factor), loss_fn(x, t, seed=5, avg_factor=avg_factor))
    # more float values than the recompile limit: symbolic, no recompile per value (a float in
    # torch.full was specialized: fullgraph failed after 8)
    compiled_for = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for avg_factor in torch.linspace(15.5, 30.5, torch._dynamo.config.recompile_limit + 2).tolist():
        torch.testing.assert_close(step(x, t, avg_factor), loss_fn(x, t, seed=5, avg_factor=avg_factor))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled_for


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_compile_takes_a_changing_offset_and_ignore_index(backend, rng):
    # recompiled after a change, they are symbolic ints where the fused op's fake sees them
    if backend != "reference":
        skip_unless_runs(backend)
    torch._dynamo.reset()
    counts = torch.randint(1, 10**5, (6,), generator=rng).tolist()
    x, t = torch.randn(2, 6, 4, 4, generator=rng), torch.randint(0, 6, (2, 4, 4), generator=rng)

    def loss(offset, ignore_index):
        return blv_cross_entropy(x, t, class_counts=counts, seed=5, offset=offset, ignore_index=ignore_index,
                                 backend=backend)  # fmt: skip

    step = torch.compile(loss, backend="aot_eager", fullgraph=True)
    for offset, ignore_index in ((0, 255), (7, 254), (9, 3)):
        torch.testing.assert_close(step(offset, ignore_index), loss(offset, ignore_index))


def test_compiled_backward_ignores_the_grad_output_of_ignored_positions(rng):
    # the traced backward (the op's autograd formula) as the eager one: an ignored position's
    # gradient is 0 even where grad_output is inf (the derivative of sqrt at a loss of 0), for an
    # ignore_index that has turned symbolic
    skip_unless_runs("cpu")
    torch._dynamo.reset()
    counts = torch.randint(1, 10**5, (6,), generator=rng).tolist()
    x, t = torch.randn(2, 6, 4, 4, generator=rng), torch.randint(0, 6, (2, 4, 4), generator=rng)

    def loss(logits, ignore_index):
        return blv_cross_entropy(logits, t, class_counts=counts, seed=5, ignore_index=ignore_index, reduction="none",
                                 backend="cpu").sqrt().sum()  # fmt: skip

    def grad(loss, ignore_index):
        logits = x.clone().requires_grad_(True)
        return torch.autograd.grad(loss(logits, ignore_index), logits)[0]

    step = torch.compile(loss, backend="aot_eager", fullgraph=True)
    for ignore_index in (2, 4):
        compiled = grad(step, ignore_index)
        assert compiled.movedim(1, -1)[t == ignore_index].eq(0).all() and compiled.isfinite().all()
        torch.testing.assert_close(compiled, grad(loss, ignore_index))


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_functional_form_compiles_with_a_changing_sigma(backend, dynamic, rng):
    # a changing sigma, a number argument, turns symbolic (with dynamic=True from the start): its
    # constants are the host's math.erf, which a trace cannot run (fullgraph failed), and the checks of
    # numbers may not branch on it
    if backend != "reference":
        skip_unless_runs(backend)
    torch._dynamo.reset()
    counts = torch.randint(1, 10**5, (6,), generator=rng).tolist()
    x, t = torch.randn(2, 6, 4, 4, generator=rng), torch.randint(0, 6, (2, 4, 4), generator=rng)

    def loss(sigma):
        return blv_cross_entropy(x, t, class_counts=counts, sigma=sigma, seed=5, backend=backend)

    compiles = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    step = torch.compile(loss, fullgraph=True, dynamic=dynamic, backend=compiles)
    torch.testing.assert_close(step(6.0), loss(6.0))
    first = compiles.frame_count
    for sigma in (4.0, 0.5, 2.5):  # both erfinv paths
        torch.testing.assert_close(step(sigma), loss(sigma))
    # no recompile; automatic: one, when sigma first changes (torch then makes it symbolic)
    assert compiles.frame_count == first + (not dynamic)
    with pytest.raises(ValueError, match="sigma must be a number in \\[0, 1e\\+37\\], got -1.0"):
        step(-1.0)


@pytest.mark.parametrize("backend", [*FUSED, "reference"])
def test_sigma_schedule_compiles_nothing(backend, rng):
    # sigma lives on the device: setting it every step changes no guard of the graph
    skip_unless_runs(backend)
    model = _TinySegmenter(5, backend).to(DEVICE)
    image, labels = _segmenter_batch(rng)
    compiles = []
    compiled = torch.compile(model, fullgraph=True, backend=lambda gm, _: compiles.append(gm) or gm.forward)
    for sigma in (0.0, 0.5, 2.0, 6.0):  # both erfinv paths and no variation at all
        model.loss.sigma = sigma
        torch.manual_seed(7)
        loss = compiled(image, labels)
        torch.manual_seed(7)
        expected = blv_cross_entropy(model.conv(image), labels, class_counts=list(range(1, 6)), sigma=sigma,
                                     ignore_index=255, backend="reference")  # fmt: skip
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert len(compiles) == 1


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs and sync debug mode need a GPU")
@pytest.mark.parametrize("backend", [*FUSED, "reference"])
def test_cuda_graph_replays_fresh_noise_and_the_scheduled_sigma_without_sync(backend):
    skip_unless_runs(backend)
    loss_fn = BLVLoss(list(range(1, 20)), sigma=6.0, backend=backend).cuda()
    x = torch.randn(2, 19, 64, 64, device="cuda", requires_grad=True)
    target = torch.randint(0, 19, (2, 64, 64), device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles the kernels) outside the graph
        loss_fn(x, target).backward()
    torch.cuda.current_stream().wait_stream(stream)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss_fn(x, target).backward()  # eager: no host sync either
        x.grad = None
        with torch.cuda.graph(graph):
            loss = loss_fn(x, target)
            loss.backward()
        losses, grads = [], []
        for _ in range(3):
            graph.replay()
            losses.append(loss.detach().clone())
            grads.append(x.grad.detach().clone())
        loss_fn.sigma = 0.0  # a schedule step after capture: the replay must see it
        graph.replay()
        at_zero = loss.detach().clone()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len({float(v) for v in losses}) == 3  # a new seed, drawn on the device, per replay
    assert not torch.equal(grads[0], grads[1])
    plain = torch.nn.functional.cross_entropy(x.detach(), target)
    torch.testing.assert_close(at_zero, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not HAS_CUDA, reason="inductor's CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", [*FUSED, "reference"])
def test_functional_form_under_reduce_overhead_matches_eager(backend, rng):
    # a changing sigma turns symbolic, and its constants are then a host op in the graph: inductor's
    # CUDA graphs must still give eager's loss and gradient (partitioned around it, or skipped)
    skip_unless_runs(backend)
    torch._dynamo.reset()
    x = torch.randn(2, 19, 16, 16, generator=rng).cuda()
    target = torch.randint(0, 19, (2, 16, 16), generator=rng).cuda()

    def loss_and_grad(logits, sigma):
        logits = logits.detach().requires_grad_(True)
        loss = blv_cross_entropy(logits, target, class_counts=list(range(1, 20)), sigma=sigma, seed=7, backend=backend)
        return loss, torch.autograd.grad(loss, logits)[0]

    step = torch.compile(loss_and_grad, mode="reduce-overhead")
    for sigma in (6.0, 4.0, 2.5, 4.0):
        got, expected = step(x, sigma), loss_and_grad(x, sigma)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)


def test_gradient_through_autograd_grad_is_detached(fused, rng):
    x = torch.randn(3, 7, generator=rng).to(DEVICE).requires_grad_(True)
    target = torch.randint(0, 7, (3,), generator=rng).to(DEVICE)
    (grad,) = torch.autograd.grad(blv_cross_entropy(x, target, class_counts=list(range(1, 8)), backend=fused), x)
    assert not grad.requires_grad and grad.grad_fn is None
