"""The mmsegmentation adapter: mmseg's reductions, checked against the reference and against mmseg's own code."""

import importlib
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from blv_kernels import noise, reference
from blv_kernels.integrations.mmseg import EPS, MMSegBLVLoss
from blv_kernels.loss import draw_seed
from blv_kernels.weights import class_weights

IGNORE = 255


def _batch(rng, shape=(2, 5, 4, 6)):
    logits = torch.randn(shape, generator=rng) * 2
    label = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=rng)
    label[torch.rand(label.shape, generator=rng) < 0.25] = IGNORE
    counts = torch.randint(1, 10**6, (shape[1],), generator=rng).tolist()
    return logits, label, counts


def _call_with_seed(loss_fn, logits, label, **kwargs):
    """The adapter's loss and the seed it drew (from the default generator, as blv_cross_entropy does)."""
    torch.manual_seed(1234)
    seed = draw_seed(logits.device)
    torch.manual_seed(1234)
    return loss_fn(logits, label, **kwargs), seed


def _mmseg_semantics(logits, label, counts, sigma, seed, *, reduction, avg_non_ignore, class_weight=None,
                     weight=None, avg_factor=None, loss_weight=1.0):  # fmt: skip
    """mmseg's cross_entropy + weight_reduce_loss, written out over the reference's per-position BLV loss."""
    per_position = reference.blv_cross_entropy(
        logits,
        label,
        class_counts=counts,
        sigma=sigma,
        seed=seed,
        weight=class_weight,
        ignore_index=IGNORE,
        reduction="none",
    )
    if weight is not None:
        per_position = per_position * weight
    if reduction == "none":
        return loss_weight * per_position
    if reduction == "sum":
        return loss_weight * per_position.sum()
    valid = label != IGNORE
    if avg_factor is None:
        if class_weight is None:
            avg_factor = valid.sum() if avg_non_ignore else label.numel()
        else:  # ignored positions count 1 unless avg_non_ignore (mmseg 1.x raises IndexError here)
            per_class = class_weight[label.clamp(0, len(counts) - 1)]
            avg_factor = torch.where(valid, per_class, 0.0 if avg_non_ignore else 1.0).sum()
    return loss_weight * per_position.sum() / (avg_factor + EPS)


CASES = [
    pytest.param(dict(reduction="mean", avg_non_ignore=False), id="mean-all-positions"),
    pytest.param(dict(reduction="mean", avg_non_ignore=True), id="mean-non-ignored"),
    pytest.param(dict(reduction="sum", avg_non_ignore=False), id="sum"),
    pytest.param(dict(reduction="none", avg_non_ignore=False), id="none"),
    pytest.param(dict(reduction="mean", avg_non_ignore=False, weighted=True), id="mean-all-position-weight"),
    pytest.param(dict(reduction="mean", avg_non_ignore=True, weighted=True), id="mean-non-ignored-position-weight"),
    pytest.param(dict(reduction="mean", avg_non_ignore=False, class_weighted=True), id="mean-all-class-weight"),
    pytest.param(dict(reduction="mean", avg_non_ignore=True, class_weighted=True), id="mean-non-ignored-class-weight"),
    pytest.param(dict(reduction="sum", avg_non_ignore=True, class_weighted=True, weighted=True), id="sum-both-weights"),
    pytest.param(dict(reduction="none", avg_non_ignore=True, class_weighted=True, weighted=True), id="none-both"),
]


@pytest.mark.parametrize("case", CASES)
def test_training_loss_matches_mmseg_semantics_over_reference(rng, case):
    logits, label, counts = _batch(rng)
    class_weight = torch.rand(logits.shape[1], generator=rng) + 0.5 if case.get("class_weighted") else None
    weight = torch.rand(label.shape, generator=rng) if case.get("weighted") else None
    loss_fn = MMSegBLVLoss(
        counts, sigma=4.0, loss_weight=0.7, avg_non_ignore=case["avg_non_ignore"], class_weight=class_weight,
        reduction=case["reduction"],
    )  # fmt: skip
    tri, seed = _call_with_seed(loss_fn, logits, label, weight=weight, ignore_index=IGNORE)
    ref = _mmseg_semantics(
        logits, label, counts, 4.0, seed, reduction=case["reduction"], avg_non_ignore=case["avg_non_ignore"],
        class_weight=class_weight, weight=weight, loss_weight=0.7,
    )  # fmt: skip
    torch.testing.assert_close(tri, ref)


def test_explicit_avg_factor_and_reduction_override(rng):
    logits, label, counts = _batch(rng)
    weight = torch.rand(label.shape, generator=rng)
    loss_fn = MMSegBLVLoss(counts, sigma=6.0, reduction="sum")
    tri, seed = _call_with_seed(loss_fn, logits, label, weight=weight, avg_factor=37.5, reduction_override="mean")
    ref = _mmseg_semantics(logits, label, counts, 6.0, seed, reduction="mean", avg_non_ignore=False, weight=weight,
                           avg_factor=37.5)  # fmt: skip
    torch.testing.assert_close(tri, ref)
    # reduction "none" ignores avg_factor, as mmseg's weight_reduce_loss does; "sum" refuses it
    tri, seed = _call_with_seed(loss_fn, logits, label, avg_factor=37.5, reduction_override="none")
    ref = _mmseg_semantics(logits, label, counts, 6.0, seed, reduction="none", avg_non_ignore=False)
    torch.testing.assert_close(tri, ref)
    with pytest.raises(ValueError, match="avg_factor can not be used"):
        loss_fn(logits, label, avg_factor=37.5)
    with pytest.raises(ValueError, match="reduction_override"):
        loss_fn(logits, label, reduction_override="avg")


def test_all_ignored_gives_zero_not_nan(rng):
    logits, label, counts = _batch(rng)
    label.fill_(IGNORE)
    loss = MMSegBLVLoss(counts, avg_non_ignore=True)(logits.requires_grad_(), label)
    assert loss.item() == 0.0  # 0 / (0 + eps), mmseg's eps
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_eval_is_plain_cross_entropy_and_gradient_flows(rng):
    logits, label, counts = _batch(rng)
    logits.requires_grad_()
    loss_fn = MMSegBLVLoss(counts, sigma=6.0, avg_non_ignore=True)
    loss_fn(logits, label).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    loss_fn.eval()
    ref = _mmseg_semantics(logits.detach(), label, counts, 0.0, None, reduction="mean", avg_non_ignore=True)
    torch.testing.assert_close(loss_fn(logits.detach(), label), ref)


def test_options_names_and_counts_from_json(rng, tmp_path):
    logits, label, counts = _batch(rng)
    path = tmp_path / "counts.json"
    path.write_text(json.dumps(counts))
    loss_fn = MMSegBLVLoss(str(path), sigma=4.0, mode="clamp")
    assert loss_fn.loss_name == "loss_blv"  # mmseg sums only log keys containing "loss" into the total
    assert MMSegBLVLoss(counts, loss_name="loss_blv_aux").loss_name == "loss_blv_aux"
    torch.testing.assert_close(loss_fn.variation_weight, class_weights(counts))
    assert loss_fn.avg_non_ignore is False and loss_fn.loss_weight == 1.0 and loss_fn.mode == "clamp"
    with pytest.raises(ValueError, match="reduction must be one of"):
        MMSegBLVLoss(counts, reduction="avg")


def test_fused_kernel_path_matches_reference(rng, device):
    """backend='triton' (the GPU path; interpreted on the CPU) with a tensor avg_factor and position weights."""
    pytest.importorskip("triton")
    logits, label, counts = _batch(rng, shape=(2, 5, 3, 4))
    weight = torch.rand(label.shape, generator=rng)
    kwargs = dict(class_weight=torch.rand(5, generator=rng) + 0.5, avg_non_ignore=True)
    args = (logits.to(device), label.to(device))
    tri, _ = _call_with_seed(
        MMSegBLVLoss(counts, backend="triton", **kwargs).to(device), *args, weight=weight.to(device)
    )
    ref, _ = _call_with_seed(
        MMSegBLVLoss(counts, backend="reference", **kwargs).to(device), *args, weight=weight.to(device)
    )
    torch.testing.assert_close(tri, ref)


# mmseg's own code -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mmseg_cross_entropy():
    """mmseg's ``cross_entropy`` from mmseg/models/losses/cross_entropy_loss.py.

    With mmcv-lite (what pip installs here), ``mmseg.models`` cannot be imported (its
    ``__init__`` needs mmcv's compiled ops), so the two loss files are loaded as a package of
    their own; with a full mmcv the normal import is used.
    """
    mmseg = pytest.importorskip("mmseg", reason="mmsegmentation (with mmcv or mmcv-lite) is not installed")
    try:
        from mmseg.models.losses.cross_entropy_loss import cross_entropy
    except ImportError:
        package = types.ModuleType("_mmseg_losses")
        package.__path__ = [str(Path(mmseg.__file__).parent / "models" / "losses")]
        sys.modules["_mmseg_losses"] = package
        cross_entropy = importlib.import_module("_mmseg_losses.cross_entropy_loss").cross_entropy
    return cross_entropy


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("avg_non_ignore", [False, True], ids=["all", "non-ignored"])
@pytest.mark.parametrize("weighted", [False, True], ids=["", "position-weight"])
def test_equals_mmseg_cross_entropy_of_perturbed_logits(rng, mmseg_cross_entropy, reduction, avg_non_ignore, weighted):
    logits, label, counts = _batch(rng)
    weight = torch.rand(label.shape, generator=rng) if weighted else None
    loss_fn = MMSegBLVLoss(counts, sigma=6.0, loss_weight=1.5, avg_non_ignore=avg_non_ignore, reduction=reduction)
    tri, seed = _call_with_seed(loss_fn, logits, label, weight=weight, ignore_index=IGNORE)
    v = noise.variation(logits.shape, 6.0, seed=seed)
    perturbed = logits + v * class_weights(counts).reshape(1, -1, 1, 1)
    ref = 1.5 * mmseg_cross_entropy(
        perturbed, label, weight, reduction=reduction, ignore_index=IGNORE, avg_non_ignore=avg_non_ignore
    )
    torch.testing.assert_close(tri, ref)
    loss_fn.eval()
    ref = 1.5 * mmseg_cross_entropy(
        logits, label, weight, reduction=reduction, ignore_index=IGNORE, avg_non_ignore=avg_non_ignore
    )
    torch.testing.assert_close(loss_fn(logits, label, weight, ignore_index=IGNORE), ref)


def test_class_weight_equals_mmseg_without_ignored_labels(rng, mmseg_cross_entropy):
    """mmseg 1.x defines class-weighted means only when no label is ignored (else IndexError)."""
    logits, label, counts = _batch(rng)
    label[label == IGNORE] = 0
    class_weight = torch.rand(5, generator=rng) + 0.5
    for avg_non_ignore in (False, True):
        loss_fn = MMSegBLVLoss(counts, class_weight=class_weight, avg_non_ignore=avg_non_ignore).eval()
        ref = mmseg_cross_entropy(
            logits, label, class_weight=class_weight, ignore_index=IGNORE, avg_non_ignore=avg_non_ignore
        )
        torch.testing.assert_close(loss_fn(logits, label), ref)


def test_registered_in_mmseg_registry(monkeypatch, rng, tmp_path):
    MODELS = pytest.importorskip("mmseg.registry", reason="mmsegmentation is not installed").MODELS
    assert MODELS.module_dict["BLVLoss"] is MMSegBLVLoss
    # MODELS.build first imports mmseg.models, which needs mmcv's compiled ops; mmcv-lite has none
    monkeypatch.setattr(MODELS, "_imported", True)
    logits, label, counts = _batch(rng)
    path = tmp_path / "counts.json"
    path.write_text(json.dumps(counts))
    cfg = dict(type="BLVLoss", class_counts=str(path), sigma=4.0, loss_weight=0.4, avg_non_ignore=True)  # README's
    loss_fn = MODELS.build(cfg)
    assert isinstance(loss_fn, MMSegBLVLoss) and loss_fn.sigma == 4.0 and loss_fn.loss_weight == 0.4
    tri, seed = _call_with_seed(loss_fn, logits, label)
    torch.testing.assert_close(
        tri, _mmseg_semantics(logits, label, counts, 4.0, seed, reduction="mean", avg_non_ignore=True, loss_weight=0.4)
    )


def test_importing_the_package_needs_no_mmseg():
    code = (
        "import sys, blv_kernels, blv_kernels.integrations, blv_kernels.__main__\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('mmseg', 'mmengine', 'mmcv')]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
