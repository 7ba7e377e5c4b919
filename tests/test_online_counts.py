"""The online ClassCounter: labels, pseudo-labels, EMA, smoothing, and the all-reduce across processes."""

import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from blv_kernels import BLVLoss, class_weights
from blv_kernels.integrations import ClassCounter

C = 5


def _labels(rng, shape=(2, 6, 7), ignore_index=255):
    label = torch.randint(0, C, shape, generator=rng, dtype=torch.uint8)
    label[torch.rand(shape, generator=rng) < 0.2] = ignore_index
    return label


def _bincount(label, ignore_index=255):
    flat = label.flatten().long()
    return torch.bincount(flat[flat != ignore_index], minlength=C).double()


def test_update_sums_labels(rng):
    counter = ClassCounter(C)
    a, b = _labels(rng), _labels(rng)
    counter.update(a)
    counter.update(b.int())
    torch.testing.assert_close(counter.counts(), _bincount(a) + _bincount(b))
    with pytest.raises(ValueError, match="outside"):
        counter.update(torch.full((2, 2), C))
    with pytest.raises(TypeError, match="integer class indices"):
        counter.update(a.float())


def test_update_from_logits_counts_confident_argmax(rng):
    counter = ClassCounter(C, ignore_index=-100, threshold=0.5)
    logits = torch.randn(2, C, 6, 7, generator=rng) * 3
    probs = logits.softmax(dim=1)
    confidence, pseudo = probs.max(dim=1)
    counter.update_from_logits(logits)
    expected = torch.bincount(pseudo[confidence >= 0.5], minlength=C).double()
    torch.testing.assert_close(counter.counts(), expected)
    assert 0 < expected.sum() < pseudo.numel()  # the threshold dropped some positions, not all
    with pytest.raises(ValueError, match="logits must have shape"):
        counter.update_from_logits(torch.randn(2, C + 1, 3, generator=rng))


def test_ema(rng):
    counter = ClassCounter(C, ema_decay=0.9)
    a, b = _labels(rng), _labels(rng)
    counter.update(a)
    counter.update(b)
    torch.testing.assert_close(counter.counts(), 0.9 * 0.1 * _bincount(a) + 0.1 * _bincount(b))


def test_apply_with_smoothing_updates_loss_in_place(rng):
    loss = BLVLoss(torch.randint(1, 100, (C,), generator=rng).tolist())
    buffer = loss.variation_weight
    counter = ClassCounter(C, smoothing=2.0)
    label = _labels(rng)
    label[label == 3] = 255  # class 3 unseen: smoothing keeps its weight finite
    counter.update(label)
    counts = counter.apply(torch.nn.Sequential(torch.nn.Identity(), loss))
    assert loss.variation_weight is buffer
    torch.testing.assert_close(loss.variation_weight, class_weights(counts, smoothing=2.0))
    torch.testing.assert_close(counter.weights(), loss.variation_weight)
    assert loss.variation_weight[3] == 1.0  # the rarest class


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_classes=0), "num_classes"),
        (dict(num_classes=C, threshold=1.5), "threshold"),
        (dict(num_classes=C, ema_decay=1.0), "ema_decay"),
        (dict(num_classes=C, smoothing=-1.0), "smoothing"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassCounter(**kwargs)


def _rank_labels(rank):
    return _labels(torch.Generator().manual_seed(100 + rank))


def _distributed_worker(rank, world_size, port):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        counter = ClassCounter(C, smoothing=1.0)
        counter.update(_rank_labels(rank))
        total = sum(_bincount(_rank_labels(r)) for r in range(world_size))
        torch.testing.assert_close(counter.counts(), total)
        torch.testing.assert_close(counter._local, _bincount(_rank_labels(rank)))  # the reduce left it local
        loss = BLVLoss([1] * C)
        counter.apply(loss)
        torch.testing.assert_close(loss.variation_weight, class_weights(total, smoothing=1.0))
    finally:
        dist.destroy_process_group()


def test_all_reduce_across_two_processes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_distributed_worker, args=(2, port), nprocs=2, join=True)
