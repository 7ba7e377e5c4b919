"""The mmsegmentation adapter: mmseg's reductions, checked against the reference and against mmseg's own code."""

import importlib
import json
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from blv_kernels import blv_cross_entropy, noise
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
    per_position = blv_cross_entropy(
        logits,
        label,
        class_counts=counts,
        sigma=sigma,
        seed=seed,
        weight=class_weight,
        ignore_index=IGNORE,
        reduction="none",
        backend="reference",
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
    assert MMSegBLVLoss(counts)(logits, label, avg_factor=0).item() == 0.0  # given as 0: the same
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


def test_eval_checks_the_class_count_as_training_does(rng):
    logits, label, counts = _batch(rng)
    loss_fn = MMSegBLVLoss(counts[:-1]).eval()
    with pytest.raises(
        ValueError, match=r"^logits have C=5 classes, but this loss was built for 4 \(its class counts\)$"
    ):
        loss_fn(logits, label)


def test_compiles_with_changing_shapes(rng):
    # mmseg's default divisor, label.numel() + eps, turns symbolic when the shape changes
    counts = torch.randint(1, 10**5, (5,), generator=rng).tolist()
    loss_fn = MMSegBLVLoss(counts)
    step = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    for shape in ((2, 5, 4, 6), (2, 5, 5, 7), (2, 5, 6, 3)):
        logits, label, _ = _batch(rng, shape)
        torch.testing.assert_close(_call_with_seed(step, logits, label)[0], _call_with_seed(loss_fn, logits, label)[0])


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
@pytest.mark.parametrize("weighted", ["", "position-weight", "broadcast"])  # broadcast: (N, 1, W), as mmseg multiplies
def test_equals_mmseg_cross_entropy_of_perturbed_logits(rng, mmseg_cross_entropy, reduction, avg_non_ignore, weighted):
    logits, label, counts = _batch(rng)
    weight_shape = label.shape if weighted == "position-weight" else (label.shape[0], 1, label.shape[2])
    weight = torch.rand(weight_shape, generator=rng) if weighted else None
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


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["", "position-weight"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_logits_give_mmseg_cross_entropys_dtype(rng, mmseg_cross_entropy, dtype, weighted, reduction):
    # outside autocast mmseg's loss is the logits' dtype, float32 once multiplied by a position
    # weight (loss * weight.float()); the values within a few roundings of that dtype (mmseg rounds
    # each position's loss, the adapter only the result)
    logits, label, counts = _batch(rng)
    logits = logits.to(dtype)
    weight = torch.rand(label.shape, generator=rng) if weighted else None
    ref = mmseg_cross_entropy(logits, label, weight, reduction=reduction, ignore_index=IGNORE)
    assert ref.dtype == (torch.float32 if weighted else dtype)
    loss_fn = MMSegBLVLoss(counts, sigma=0.0, reduction=reduction, backend="cpu")
    eps = torch.finfo(dtype).eps  # two roundings of half an ulp each, at most
    for mode in ("train", "eval"):
        loss = getattr(loss_fn, mode)()(logits, label, weight, ignore_index=IGNORE)
        assert loss.dtype == ref.dtype, mode
        torch.testing.assert_close(loss.float(), ref.float(), rtol=eps, atol=eps, msg=mode)


@pytest.mark.parametrize("ignore_index", [0, 3, -1, -5])
@pytest.mark.parametrize("avg_non_ignore", [False, True], ids=["all", "non-ignored"])
def test_class_weight_with_an_ignore_index_among_the_classes_equals_mmseg(rng, mmseg_cross_entropy, ignore_index,
                                                                          avg_non_ignore):  # fmt: skip
    """Where ignore_index indexes the class weights (in [-C, C)), mmseg's mean over all positions
    counts class_weight[ignore_index] at each ignored position: so does the adapter, in training
    (sigma = 0) and in eval."""
    logits, label, counts = _batch(rng)
    label[label == IGNORE] = ignore_index
    class_weight = torch.rand(5, generator=rng) + 0.5
    ref = mmseg_cross_entropy(
        logits, label, class_weight=class_weight, ignore_index=ignore_index, avg_non_ignore=avg_non_ignore
    )
    loss_fn = MMSegBLVLoss(counts, sigma=0.0, class_weight=class_weight, avg_non_ignore=avg_non_ignore)
    torch.testing.assert_close(loss_fn(logits, label, ignore_index=ignore_index), ref)
    torch.testing.assert_close(loss_fn.eval()(logits, label, ignore_index=ignore_index), ref)


def test_class_weight_equals_mmseg_without_ignored_labels(rng, mmseg_cross_entropy):
    """mmseg 1.x defines class-weighted means with ignore_index 255 only when no label is ignored
    (else IndexError)."""
    logits, label, counts = _batch(rng)
    label[label == IGNORE] = 0
    class_weight = torch.rand(5, generator=rng) + 0.5
    for avg_non_ignore in (False, True):
        loss_fn = MMSegBLVLoss(counts, class_weight=class_weight, avg_non_ignore=avg_non_ignore).eval()
        ref = mmseg_cross_entropy(
            logits, label, class_weight=class_weight, ignore_index=IGNORE, avg_non_ignore=avg_non_ignore
        )
        torch.testing.assert_close(loss_fn(logits, label), ref)


# Building from a config through the registry ---------------------------------------------

# The README's config: custom_imports registers BLVLoss (and the hook) when the config is loaded.
CONFIG = """
custom_imports = dict(
    imports=["blv_kernels.integrations.mmseg", "blv_kernels.integrations.hooks"], allow_failed_imports=False
)
model = dict(
    decode_head=dict(
        loss_decode=dict(
            type="BLVLoss", class_counts={counts!r}, sigma=4.0, mode="abs", loss_weight=0.4, avg_non_ignore=True,
            class_weight={class_weight!r}, loss_name="loss_blv",
        )
    )
)
custom_hooks = [dict(type="SigmaScheduleHook", sigma_0=6.0, t_mid=30000, t_end=40000)]
"""

# A training script's start, in a fresh interpreter: load the config, build the loss as mmseg's
# decode head does (MODELS.build(loss_decode)). argv: the config, then "mmseg" to build through
# mmseg's MODELS (the user's snippet; mmseg.models must import) or "downstream" to build through a
# registry whose parent is mmseg's MODELS, as OpenMMLab projects declare theirs (lookups fall
# through to mmseg's table; mmseg's own models, which need mmcv's compiled ops, are not imported).
BUILD_SCRIPT = """
import json, sys
from mmengine.config import Config
from mmengine.registry import HOOKS, Registry
from mmseg.registry import MODELS

assert "BLVLoss" not in MODELS.module_dict, "registered before the config's custom_imports ran"
cfg = Config.fromfile(sys.argv[1])
registry = MODELS if sys.argv[2] == "mmseg" else Registry("model", parent=MODELS, scope="my_project")
loss = registry.build(cfg.model.decode_head.loss_decode)
hook = HOOKS.build(cfg.custom_hooks[0])
print(json.dumps(dict(
    registered=MODELS.module_dict["BLVLoss"].__qualname__, built=type(loss).__qualname__, sigma=loss.sigma,
    loss_weight=loss.loss_weight, avg_non_ignore=loss.avg_non_ignore, loss_name=loss.loss_name,
    variation_weight=loss.variation_weight.tolist(), class_weight=loss.weight.tolist(),
    hook=type(hook).__qualname__, sigma_at_35000=hook.schedule(35000),
)))
"""


def _build_from_config(tmp_path, rng, registry: str) -> tuple[dict, list, torch.Tensor]:
    counts = torch.randint(1, 10**6, (5,), generator=rng).tolist()
    class_weight = torch.rand(5, generator=rng) + 0.5
    counts_path, weight_path, config = tmp_path / "counts.json", tmp_path / "class_weight.npy", tmp_path / "blv.py"
    counts_path.write_text(json.dumps(counts))
    np.save(weight_path, class_weight.numpy())
    config.write_text(CONFIG.format(counts=str(counts_path), class_weight=str(weight_path)))
    proc = subprocess.run([sys.executable, "-c", BUILD_SCRIPT, str(config), registry], capture_output=True,
                          text=True, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), counts, class_weight


def _check_built(built: dict, counts: list, class_weight: torch.Tensor) -> None:
    assert built["registered"] == built["built"] == "MMSegBLVLoss" and built["hook"] == "SigmaScheduleHook"
    assert built["sigma"] == 4.0 and built["loss_weight"] == 0.4 and built["avg_non_ignore"] is True
    assert built["loss_name"] == "loss_blv" and built["sigma_at_35000"] == 3.0
    torch.testing.assert_close(torch.tensor(built["variation_weight"]), class_weights(counts))
    torch.testing.assert_close(torch.tensor(built["class_weight"]), class_weight)


def test_config_builds_the_loss_through_the_registry(rng, tmp_path):
    """custom_imports registers BLVLoss in mmseg's MODELS; a config's loss_decode builds from it."""
    pytest.importorskip("mmseg.registry", reason="mmsegmentation is not installed")
    _check_built(*_build_from_config(tmp_path, rng, "downstream"))


@pytest.fixture(scope="module")
def mmseg_models_import():
    """Skip unless mmseg's own models import: they need mmcv with its compiled ops (the [test] extra
    installs mmcv-lite, which has none) and ftfy and regex (which mmseg 1.x does not declare)."""
    pytest.importorskip("mmseg.registry", reason="mmsegmentation is not installed")
    proc = subprocess.run([sys.executable, "-c", "import mmseg.models"], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"mmseg.models does not import here (needs full mmcv, ftfy, regex): {last}")


def test_config_builds_the_loss_through_mmseg_models(rng, tmp_path, mmseg_models_import):
    """The README's snippet as a user with a full mmseg runs it: MODELS.build(cfg.model.decode_head.loss_decode)."""
    _check_built(*_build_from_config(tmp_path, rng, "mmseg"))


def test_registry_built_loss_computes_mmseg_semantics(rng, tmp_path):
    mmseg_registry = pytest.importorskip("mmseg.registry", reason="mmsegmentation is not installed")
    from mmengine.registry import Registry

    assert mmseg_registry.MODELS.module_dict["BLVLoss"] is MMSegBLVLoss
    registry = Registry("model", parent=mmseg_registry.MODELS, scope=f"blv_test_{os.getpid()}_{id(tmp_path)}")
    logits, label, counts = _batch(rng)
    loss_fn = registry.build(dict(type="BLVLoss", class_counts=counts, sigma=4.0, loss_weight=0.4, avg_non_ignore=True))
    assert isinstance(loss_fn, MMSegBLVLoss)
    tri, seed = _call_with_seed(loss_fn, logits, label)
    torch.testing.assert_close(
        tri, _mmseg_semantics(logits, label, counts, 4.0, seed, reduction="mean", avg_non_ignore=True, loss_weight=0.4)
    )


# Constructor arguments ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def mmseg_get_class_weight(mmseg_cross_entropy):
    """mmseg's ``get_class_weight`` (mmseg/models/losses/utils.py), loaded as mmseg_cross_entropy is."""
    return sys.modules[mmseg_cross_entropy.__module__.rpartition(".")[0] + ".utils"].get_class_weight


@pytest.mark.parametrize("suffix", [".npy", ".json", ".yaml", ".pkl"])
def test_class_weight_from_a_file_as_mmseg_reads_it(rng, tmp_path, mmseg_get_class_weight, suffix):
    logits, label, counts = _batch(rng)
    class_weight = (torch.rand(5, generator=rng, dtype=torch.float64) + 0.5).numpy()
    path = tmp_path / f"class_weight{suffix}"
    if suffix == ".npy":
        np.save(path, class_weight)
    else:
        from mmengine.fileio import dump

        dump(class_weight.tolist(), str(path))
    from_file = MMSegBLVLoss(counts, class_weight=str(path))
    torch.testing.assert_close(
        from_file.weight, torch.as_tensor(mmseg_get_class_weight(str(path)), dtype=torch.float32)
    )
    from_list = MMSegBLVLoss(counts, class_weight=class_weight.tolist())
    torch.testing.assert_close(
        _call_with_seed(from_file, logits, label)[0], _call_with_seed(from_list, logits, label)[0]
    )


def test_bad_class_weights(tmp_path):
    (tmp_path / "w.json").write_text(json.dumps({"road": 1.0}))
    with pytest.raises(
        TypeError, match="^class_weight must be a tensor or a list of numbers, one per class, got {'road'"
    ):
        MMSegBLVLoss([1, 2, 3], class_weight=str(tmp_path / "w.json"))
    with pytest.raises(ValueError, match="finite"):
        MMSegBLVLoss([1, 2, 3], class_weight=[1.0, float("nan"), 1.0])
    for missing in ("missing.npy", "missing.yaml"):
        with pytest.raises(FileNotFoundError, match=f"^class_weight='{tmp_path / missing}': no such file$"):
            MMSegBLVLoss([1, 2, 3], class_weight=str(tmp_path / missing))
    # files that hold no class weights: named, not numpy's or mmengine's words alone
    np.save(tmp_path / "objects.npy", np.array([{"road": 1.0}], dtype=object))
    (tmp_path / "weights.py").write_text("weights = [1.0, 2.0, 3.0]\n")
    for name in ("objects.npy", "weights.py"):
        with pytest.raises(ValueError, match=f"^class_weight='{tmp_path / name}': cannot read class weights from it: "):
            MMSegBLVLoss([1, 2, 3], class_weight=str(tmp_path / name))
    with pytest.raises(ValueError, match="one entry per class"):
        MMSegBLVLoss([1, 2, 3], class_weight=[1.0, 2.0])
    for given in (torch.ones(3, dtype=torch.complex64), np.ones(3, dtype=np.complex128), np.ones(3, dtype=bool)):
        with pytest.raises(TypeError, match=f"^class_weight must be real numbers, got a {given.dtype}"):
            MMSegBLVLoss([1, 2, 3], class_weight=given)


def test_malformed_json_files_are_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{bad")
    for arguments in (dict(class_counts=str(bad)), dict(class_counts=[1, 2, 3], class_weight=bad)):
        with pytest.raises(ValueError, match=f"^{re.escape(str(bad))} is not valid JSON: Expecting property name"):
            MMSegBLVLoss(**arguments)


def test_numpy_scalar_arguments(rng):
    logits, label, _ = _batch(rng)
    counts = [0, 1, 3, 10, 100]  # small, one of them 0: the smoothing changes every weight
    from_numpy = MMSegBLVLoss(np.array(counts), sigma=np.float32(4.0), loss_weight=np.float64(0.5),
                              avg_non_ignore=np.bool_(True), smoothing=np.float32(1.0))  # fmt: skip
    plain = MMSegBLVLoss(counts, sigma=4.0, loss_weight=0.5, avg_non_ignore=True, smoothing=1.0)
    assert type(from_numpy.loss_weight) is float and from_numpy.avg_non_ignore is True and from_numpy.sigma == 4.0
    # the smoothing by value: n_c + 1 = 1, 2, 4, 11, 101 (sum 119), w_c = log(119 / (n_c + 1)) / log(119)
    expected = torch.tensor([math.log(119 / n) / math.log(119) for n in (1, 2, 4, 11, 101)], dtype=torch.float64)
    for loss in (from_numpy, plain):
        torch.testing.assert_close(loss.variation_weight.double(), expected, rtol=1e-7, atol=0)  # float32: 6e-8
    torch.testing.assert_close(_call_with_seed(from_numpy, logits, label)[0], _call_with_seed(plain, logits, label)[0])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(loss_name="blv"), ValueError, "loss_name must be a str containing 'loss'"),
        (dict(loss_weight=float("inf")), ValueError, "loss_weight must be a finite number"),
        (dict(loss_weight="1"), TypeError, "loss_weight must be a number"),
        (dict(avg_non_ignore="yes"), TypeError, "avg_non_ignore must be True or False"),
        (dict(loss_weight=10**400), ValueError, "loss_weight must be a finite number, got 1000"),  # (an OverflowError)
        (dict(class_weight=[True, False, True]), TypeError, "class_weight must be numbers, not booleans"),
        (dict(class_weight=[1, 10**400, 1]), ValueError, "class_weight must be finite in float32"),
        (dict(class_weight=torch.ones(3).to_sparse()), TypeError, "class_weight must be a dense .strided. tensor"),
        (dict(smoothing=-1.0), ValueError, "smoothing must be a finite number >= 0"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        MMSegBLVLoss([1, 2, 3], **kwargs)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (dict(avg_factor="3"), TypeError, "avg_factor must be a number, got '3'"),
        (dict(avg_factor=[3.0]), TypeError, "avg_factor must be a number, got [3.0]"),
        (dict(avg_factor=-1.0), ValueError, "avg_factor must be a finite number >= 0.0, got -1.0"),
        (dict(avg_factor=torch.ones(2)), TypeError, "avg_factor must be a number or a one-element tensor"),
        (dict(weight=[1.0]), TypeError, "weight (per position) must be a tensor of real numbers, got list"),
        (
            dict(weight=torch.ones(2, 3, 6)),
            ValueError,
            "weight (per position) of shape (2, 3, 6) does not broadcast to the labels' shape (2, 4, 6)",
        ),  # fmt: skip
        (
            dict(weight=torch.ones(2, 4, 6, dtype=torch.complex64)),
            TypeError,
            "weight (per position) must be a tensor of real numbers, got torch.complex64",
        ),  # fmt: skip
        (
            dict(weight=torch.ones(2, 1, 6, requires_grad=True)),
            ValueError,
            "weight requires grad, but BLV treats it as a constant on every backend",
        ),  # fmt: skip
        (
            dict(weight=torch.ones(2, 4, 6).to_sparse()),
            TypeError,
            "weight must be a dense (strided) tensor, got a sparse_coo one",
        ),  # fmt: skip
        (dict(weight=torch.ones(2, 4, 6, device="meta")), ValueError, "weight is on meta but target is on cpu"),
        (dict(avg_factor=10**400), ValueError, "avg_factor must be a finite number >= 0.0, got 1000"),
        (dict(ignore_index="255"), TypeError, "ignore_index must be an int, got str"),
        (dict(label=[0, 1]), TypeError, "logits and target must be tensors"),
    ],
)
@pytest.mark.parametrize("class_weight", [None, [1.0, 2.0, 0.5, 1.0, 1.0]])
def test_bad_call_arguments_get_the_loss_messages(rng, call, error, match, class_weight):
    logits, label, counts = _batch(rng)
    loss_fn = MMSegBLVLoss(counts, class_weight=class_weight)
    with pytest.raises(error, match=f"^{re.escape(match)}"):
        loss_fn(**{"cls_score": logits, "label": label, **call})


def test_logits_on_another_device_than_the_class_weights_are_named(rng):
    # the divisor reads the class weights before the loss checks its arguments: it failed in torch's words
    # (meta stands for a GPU here)
    logits, label, counts = _batch(rng)
    loss_fn = MMSegBLVLoss(counts, class_weight=[1.0, 2.0, 0.5, 1.0, 1.0])
    with pytest.raises(ValueError, match="^class_weight is on cpu but logits are on meta$"):
        loss_fn(logits.to("meta"), label.to("meta"))


def test_importing_the_package_needs_no_mmseg():
    code = (
        "import sys, blv_kernels, blv_kernels.integrations, blv_kernels.__main__\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('mmseg', 'mmengine', 'mmcv')]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
