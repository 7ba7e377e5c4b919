"""The torch.library op: opcheck, torch.compile(fullgraph=True), CUDA graphs and sync-free use."""

import pytest
import torch
import torch._inductor.config
from torch import nn

from blv_kernels import BLVLoss, blv_cross_entropy, noise
from blv_kernels import ops as blv_ops

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _op_args(rng, reduction, *, weight=False, position_weight=False):
    x = torch.randn(2, 7, 3, 5, generator=rng).to(DEVICE).requires_grad_(True)
    target = torch.randint(0, 7, (2, 3, 5), generator=rng).to(DEVICE)
    target[0, 0, 0] = -100
    w = torch.rand(7, generator=rng).to(DEVICE)
    cw = (torch.rand(7, generator=rng) + 0.5).to(DEVICE) if weight else None
    pw = (torch.rand(2, 3, 5, generator=rng) + 0.5).to(DEVICE) if position_weight else None
    seed = noise.seed_tensor(int(torch.randint(0, 2**62, (), generator=rng)), DEVICE)
    return (x, target, w, seed, 17, noise.sigma_bits(6.0, DEVICE), "abs", cw, pw, -100, reduction)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("weights", [False, True], ids=["", "weights"])
def test_opcheck(reduction, weights, rng):
    args = _op_args(rng, reduction, weight=weights, position_weight=weights)
    torch.library.opcheck(blv_ops.blv_cross_entropy_fwd, args)


class _TinySegmenter(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.conv = nn.Conv2d(3, classes, 3, padding=1)
        self.loss = BLVLoss(list(range(1, classes + 1)), sigma=6.0, ignore_index=255)

    def forward(self, image, labels):
        return self.loss(self.conv(image), labels)


# inductor draws random numbers its own way unless told to fall back to eager's generator
@torch._inductor.config.patch(fallback_random=True)
def test_compile_fullgraph_matches_eager(rng):
    model = _TinySegmenter(5).to(DEVICE)
    model.loss.backend = "triton"
    image = torch.randn(2, 3, 6, 7, generator=rng).to(DEVICE)
    labels = torch.randint(0, 5, (2, 6, 7), generator=rng, dtype=torch.uint8).to(DEVICE)
    compiled = torch.compile(model, fullgraph=True)
    torch.manual_seed(3)
    eager = model(image, labels)
    (eager_grad,) = torch.autograd.grad(eager, model.conv.weight)
    torch.manual_seed(3)
    loss = compiled(image, labels)
    (grad,) = torch.autograd.grad(loss, model.conv.weight)
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grad, eager_grad)


def test_sigma_schedule_does_not_recompile(rng):
    # sigma is read from a device buffer: setting it every step changes no guard of the graph
    model = _TinySegmenter(5).to(DEVICE)
    model.loss.backend = "triton"
    image = torch.randn(2, 3, 4, 5, generator=rng).to(DEVICE)
    labels = torch.randint(0, 5, (2, 4, 5), generator=rng, dtype=torch.uint8).to(DEVICE)
    compiles = []
    compiled = torch.compile(model, fullgraph=True, backend=lambda gm, _: compiles.append(gm) or gm.forward)
    for sigma in (0.0, 0.5, 2.0, 6.0):  # both erfinv paths and no variation at all
        model.loss.sigma = sigma
        torch.manual_seed(7)
        loss = compiled(image, labels)
        torch.manual_seed(7)
        torch.testing.assert_close(loss, model(image, labels))
        torch.manual_seed(7)
        expected = blv_cross_entropy(model.conv(image), labels, list(range(1, 6)), sigma, ignore_index=255,
                                     backend="reference")  # fmt: skip
        torch.testing.assert_close(loss, expected)
    assert len(compiles) == 1


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs and sync debug mode need a GPU")
def test_cuda_graph_replays_draw_fresh_noise_without_sync():
    # BLVLoss keeps its weights on the device; the functional form with a list of counts
    # copies them over on every call, which neither a graph nor sync-free code allows.
    loss_fn = BLVLoss(list(range(1, 20)), sigma=6.0, backend="triton").cuda()
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
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len({float(v) for v in losses}) == 3  # a new seed, drawn on the device, per replay
    assert not torch.equal(grads[0], grads[1])
