"""The online ClassCounter: labels, pseudo-labels, EMA, smoothing, and the all-reduce across processes."""

import socket
from datetime import timedelta

import numpy as np
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
    with pytest.raises(ValueError, match=rf"^labels has 4 value\(s\) outside \[0, {C}\) that are not ignore_index=255"):
        counter.update(torch.full((2, 2), C))  # (named "target", the loss's argument, before)
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


def test_apply_checks_every_loss_before_changing_any():
    model = torch.nn.ModuleList([BLVLoss([1, 2, 3]), BLVLoss([1, 2, 3, 4])])
    before = [loss.variation_weight.clone() for loss in model]
    counter = ClassCounter(3)
    counter.update(torch.tensor([0, 0, 1, 2]))
    with pytest.raises(
        ValueError, match="^BLVLoss 1 in the module has 4 classes, this counter counts 3: no loss was changed$"
    ):
        counter.apply(model)
    for loss, weight in zip(model, before, strict=True):
        assert torch.equal(loss.variation_weight, weight)


def test_confident_pseudo_labels_of_class_255_count_with_more_than_255_classes(rng):
    """Pseudo-labels below the threshold must not be marked with ignore_index: with C > 255 the
    default 255 is a class, whose confident pseudo-labels would be dropped."""
    num_classes = 300
    counter = ClassCounter(num_classes, threshold=0.6)  # ignore_index=255, the default
    logits = torch.randn(2, num_classes, 5, 6, generator=rng)
    confident_255 = torch.rand(2, 5, 6, generator=rng) < 0.5
    logits[:, 255] += torch.where(confident_255, 20.0, 0.0)
    counter.update_from_logits(logits)
    confidence, pseudo = logits.softmax(dim=1).max(dim=1)
    expected = torch.bincount(pseudo[confidence >= 0.6], minlength=num_classes).double()
    assert expected[255] == confident_255.sum() > 0
    torch.testing.assert_close(counter.counts(), expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_classes=0), "num_classes"),
        (dict(num_classes=10**12), "num_classes must be an integer >= 1 and <= "),
        (dict(num_classes=C, threshold=1.5), "threshold"),
        (dict(num_classes=C, threshold=float("nan")), "threshold"),
        (dict(num_classes=C, ema_decay=1.0), "ema_decay"),
        (dict(num_classes=C, ema_decay=-0.1), "ema_decay"),
        (dict(num_classes=C, smoothing=-1.0), "smoothing"),
        (dict(num_classes=C, smoothing=float("inf")), "smoothing"),
        (dict(num_classes=C, ignore_index=2**63), "ignore_index"),
        (dict(num_classes=C, device="not-a-device"), "device"),
        (dict(num_classes=C, device="meta"), "device 'meta' cannot hold the counts: a meta tensor holds no values"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassCounter(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_classes=5.0), "num_classes must be an integer"),
        (dict(num_classes=True), "num_classes must be an integer"),
        (dict(num_classes=C, ignore_index=255.0), "ignore_index must be an integer"),
        (dict(num_classes=C, threshold="0.9"), "threshold"),
        (dict(num_classes=C, smoothing=None), "smoothing must be a number"),
    ],
)
def test_arguments_of_the_wrong_type(kwargs, match):
    with pytest.raises(TypeError, match=match):
        ClassCounter(**kwargs)


def test_numpy_scalars_are_numbers(rng):
    counter = ClassCounter(
        np.int64(C), ignore_index=np.int32(255), threshold=np.float32(0.25), ema_decay=np.float64(0.5),
        smoothing=np.float32(2.0),
    )  # fmt: skip
    label = _labels(rng)
    counter.update(label)
    torch.testing.assert_close(counter.counts(), 0.5 * _bincount(label))
    torch.testing.assert_close(counter.weights(), class_weights(0.5 * _bincount(label), smoothing=2.0))
    loss = BLVLoss([1] * C)
    counter.apply(loss)
    torch.testing.assert_close(loss.variation_weight, counter.weights())


def test_update_takes_numpy_arrays(rng):
    label = _labels(rng)
    for dtype in (np.uint8, np.int16, np.int32, np.int64, np.uint32, np.uint64):
        counter = ClassCounter(C)
        counter.update(label.numpy().astype(dtype))
        torch.testing.assert_close(counter.counts(), _bincount(label), msg=str(dtype))
    counter = ClassCounter(C, ignore_index=-1)
    counter.update(np.where(label.numpy() == 255, -1, label.numpy()).astype(np.int8))
    torch.testing.assert_close(counter.counts(), _bincount(label))
    beyond_int64 = label.numpy().astype(np.uint64)
    beyond_int64[0, 0, 0] = 2**64 - 1  # int64 would read it as -1
    with pytest.raises(ValueError, match="outside"):
        ClassCounter(C, ignore_index=-1).update(beyond_int64)
    with pytest.raises(TypeError, match="integer class indices"):
        counter.update(label.numpy().astype(np.float32))
    with pytest.raises(TypeError, match="tensor or a numpy array"):
        counter.update(label.tolist())
    reversed_view = label.numpy().astype(np.int64)[::-1]  # a negative stride, which torch.from_numpy refuses
    counter = ClassCounter(C)
    counter.update(reversed_view)
    torch.testing.assert_close(counter.counts(), _bincount(label))


UNSIGNED_LABELS = {
    "uint64 2**64-1": [2**64 - 1, 0],  # int64 would read it as -1, ignore_index below: silently not counted
    "uint64 2**63+1": [2**63 + 1],  # int64 would read it as a negative number
    "uint32": [2, 0],
    "uint16": [2, 0],
}


@pytest.mark.parametrize("name", UNSIGNED_LABELS)
def test_update_refuses_the_unsigned_tensors_the_loss_refuses(name):
    dtype = getattr(torch, name.split()[0])
    counter = ClassCounter(3, ignore_index=-1)
    message = rf"^labels must hold integer class indices \(uint8, int8, int16, int32 or int64\), got {dtype}$"
    with pytest.raises(TypeError, match=message):
        counter.update(torch.tensor(UNSIGNED_LABELS[name], dtype=dtype))
    torch.testing.assert_close(counter.counts(), torch.zeros(3, dtype=torch.float64))  # nothing counted


def test_state_dict_resumes_the_counts(rng, tmp_path):
    counter = ClassCounter(C, ema_decay=0.9)
    counter.update(_labels(rng))
    torch.save(counter.state_dict(), tmp_path / "counter.pt")
    resumed = ClassCounter(C, ema_decay=0.9)
    resumed.load_state_dict(torch.load(tmp_path / "counter.pt"))
    torch.testing.assert_close(resumed.counts(), counter.counts())
    more = _labels(rng)
    counter.update(more)
    resumed.update(more)
    torch.testing.assert_close(resumed.counts(), counter.counts())  # the EMA goes on from the saved counts
    with pytest.raises(ValueError, match=rf"counts of shape \({C},\), this counter counts {C + 1} classes"):
        ClassCounter(C + 1).load_state_dict(counter.state_dict())
    with pytest.raises(ValueError, match="ClassCounter state dict"):
        resumed.load_state_dict({"weights": counter.counts()})
    with pytest.raises(ValueError, match="finite and >= 0"):
        resumed.load_state_dict({"counts": -counter.counts()})


def test_meta_tensors_are_refused_by_name(rng):
    """A meta tensor has a shape and no values: a one-line error naming it, not torch's copy error."""
    counter = ClassCounter(C)
    with pytest.raises(ValueError, match="^labels is a meta tensor: it holds no labels$"):
        counter.update(_labels(rng).to("meta"))
    with pytest.raises(ValueError, match="^logits is a meta tensor: it holds no values$"):
        counter.update_from_logits(torch.randn(2, C, 3, device="meta"))
    with pytest.raises(ValueError, match="^the state dict's 'counts' is a meta tensor: it holds no counts$"):
        counter.load_state_dict({"counts": torch.ones(C, dtype=torch.float64, device="meta")})
    torch.testing.assert_close(counter.counts(), torch.zeros(C, dtype=torch.float64))  # nothing half-done


def test_sparse_and_nested_tensors_are_refused_by_name(rng):
    """Not torch's errors from inside (aten::ne.Scalar on SparseCPU, "NestedTensorImpl doesn't support sizes")."""
    counter = ClassCounter(C)
    labels, logits = _labels(rng).long(), torch.randn(2, C, 3, generator=rng)
    counts = torch.ones(C, dtype=torch.float64)
    for layout, to_layout in (("sparse_coo", torch.Tensor.to_sparse),
                              ("nested", lambda t: torch.nested.as_nested_tensor([t], layout=torch.jagged))):  # fmt: skip
        with pytest.raises(TypeError, match=f"^labels must be a dense .strided. tensor, got a {layout} one$"):
            counter.update(to_layout(labels))
        with pytest.raises(TypeError, match=f"^logits must be a dense .strided. tensor, got a {layout} one$"):
            counter.update_from_logits(to_layout(logits))
        with pytest.raises(
            TypeError, match=f"^the state dict's 'counts' must be a dense .strided. tensor, got a {layout}"
        ):
            counter.load_state_dict({"counts": to_layout(counts)})
    torch.testing.assert_close(counter.counts(), torch.zeros(C, dtype=torch.float64))  # nothing half-done


@pytest.mark.parametrize("dtype", [torch.complex128, torch.bool])
def test_state_dict_counts_must_be_real_numbers(dtype):
    """A complex tensor would lose its imaginary part without a word; bools are no counts."""
    counter = ClassCounter(C)
    with pytest.raises(TypeError, match=f"^the state dict's 'counts' must hold real numbers, got {dtype}$"):
        counter.load_state_dict({"counts": torch.ones(C, dtype=dtype)})
    torch.testing.assert_close(counter.counts(), torch.zeros(C, dtype=torch.float64))


def test_repr_says_what_it_counts():
    text = repr(ClassCounter(C, ignore_index=-100, threshold=0.9, ema_decay=0.99))
    assert text.startswith("ClassCounter(") and f"num_classes={C}" in text
    assert "ignore_index=-100" in text and "threshold=0.9" in text and "ema_decay=0.99" in text


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
