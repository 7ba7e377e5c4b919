"""The long-tail evaluation (benchmarks/longtail.py): it runs end to end, its statistics give known answers on
constructed inputs, E[v] matches BLV's own variation stream, the user hook keeps the seeds paired, and bad input
gets one line on stderr and exit status 2."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks import longtail
from blv_kernels import variation

REPO_ROOT = Path(__file__).resolve().parents[1]

# Spelled out here, not read from the module: a method or field the code stops emitting must fail.
DIGITS_METHODS = [
    "ce", "la", "blv-abs-1", "blv-abs-4", "blv-abs-6", "shift-abs-1", "shift-abs-4", "shift-abs-6",
    "blv-abs-1-sched", "blv-abs-4-sched", "blv-abs-6-sched", "blv-clamp-1", "blv-clamp-4", "blv-clamp-6",
    "shift-clamp-1", "shift-clamp-4", "shift-clamp-6", "blv-clamp-1-sched", "blv-clamp-4-sched", "blv-clamp-6-sched",
]  # fmt: skip
SEGMENTATION_METHODS = ["ce", "la", "blv-abs-4", "blv-abs-6", "shift-abs-6"]
TASK_FIELDS = {
    "description",
    "kind",
    "seeds",
    "epochs",
    "methods",
    "splits",
    "runs",
    "summary",
    "noise_level",
    "seconds",
}
RUN_FIELDS = {"method", "seed", "metrics", "per_class_acc", "per_class_iou", "confusion", "train_acc", "seconds"}
METRICS = {
    "overall_acc", "balanced_acc", "many_acc", "medium_acc", "few_acc", "miou", "many_iou", "medium_iou", "few_iou",
    "few_share", "few_share_true",
}  # fmt: skip
COMPARISON_FIELDS = {"mean", "std", "n", "p_value", "wins", "losses"}
META_FIELDS = {"device", "torch", "commit", "date", "command", "wall_s"}
TINY = ["--seeds", "2", "--epochs", "1", "--scenes", "48"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    pytest.importorskip("sklearn")
    out = tmp_path_factory.mktemp("longtail")
    assert longtail.main([*TINY, "--out", str(out)]) == 0
    return out, json.loads((out / "longtail.json").read_text())


def test_json_has_every_method_seed_and_field(tiny_run):
    out, data = tiny_run
    assert META_FIELDS <= set(data["meta"])
    assert data["meta"]["command"] == f"python -m benchmarks.longtail {' '.join(TINY)} --out {out}"
    assert list(data["tasks"]) == ["digits", "segmentation"]
    for task, methods, kind in (("digits", DIGITS_METHODS, "classification"),
                                ("segmentation", SEGMENTATION_METHODS, "segmentation")):  # fmt: skip
        result = data["tasks"][task]
        assert set(result) == TASK_FIELDS
        assert result["kind"] == kind and result["seeds"] == [0, 1] and result["epochs"] == 1
        assert list(result["methods"]) == methods and all(result["methods"].values())
        runs = {(r["method"], r["seed"]): r for r in result["runs"]}
        assert set(runs) == {(m, s) for m in methods for s in (0, 1)} and len(result["runs"]) == 2 * len(methods)
        for run in result["runs"]:
            assert set(run) == RUN_FIELDS and set(run["metrics"]) == METRICS
            assert all(v is None or 0 <= v <= 1 for v in run["metrics"].values())
            assert len(run["per_class_acc"]) == len(run["per_class_iou"]) == len(run["confusion"])
        assert list(result["summary"]) == methods
        assert result["summary"]["ce"]["vs_ce"] is None
        for method in methods[1:]:
            comparison = result["summary"][method]["vs_ce"]
            assert set(comparison) == METRICS
            assert all(set(c) == COMPARISON_FIELDS for c in comparison.values())
        assert set(result["summary"]["ce"]["metrics"]) == METRICS
        assert result["noise_level"]["ce_std"] >= 0
    assert data["tasks"]["digits"]["noise_level"]["metric"] == "balanced_acc"
    assert data["tasks"]["segmentation"]["noise_level"]["metric"] == "miou"


def test_digits_split_is_long_tailed_and_the_test_split_balanced(tiny_run):
    _, data = tiny_run
    result = data["tasks"]["digits"]
    for split in result["splits"]:
        assert split["class_counts"] == [120, 72, 43, 26, 15, 9, 6, 3, 2, 1]
        assert split["groups"] == {"many": [0, 1, 2], "medium": [3, 4, 5, 6], "few": [7, 8, 9]}
    for run in result["runs"]:
        assert [sum(row) for row in run["confusion"]] == [50] * 10  # every test class 50 images
        assert run["metrics"]["few_share_true"] == pytest.approx(0.3)


def test_tables_and_plot(tiny_run, capsys):
    out, _ = tiny_run
    pytest.importorskip("matplotlib")
    assert (out / "longtail.png").read_bytes().startswith(b"\x89PNG")
    longtail.main([*TINY, "--task", "segmentation", "--out", str(out / "again"), "--no-plot"])
    printed = capsys.readouterr().out
    assert "noise level: ce's mIoU std over seeds" in printed
    for method in SEGMENTATION_METHODS:
        assert f"\n  {method} " in printed
    assert not (out / "again" / "longtail.png").exists()


# ---------------------------------------------------------------------------------------------
# Statistics on constructed inputs


def test_paired_comparison_known_answers():
    # differences 0.1, 0.05, 0.1: mean 1/12, std 0.05/sqrt(3), t = 5 with 2 degrees of freedom,
    # whose two-sided p is 1 - t / sqrt(t^2 + 2) = 1 - 5/sqrt(27)
    result = longtail.paired_comparison([0.80, 0.75, 0.90], [0.70, 0.70, 0.80])
    assert result["mean"] == pytest.approx(1 / 12)
    assert result["std"] == pytest.approx(0.05 / math.sqrt(3))
    assert result["p_value"] == pytest.approx(1 - 5 / math.sqrt(27))
    assert (result["wins"], result["losses"], result["n"]) == (3, 0, 3)
    # differences 0.1, -0.05, 0.1: mean 0.05, std sqrt(0.0075), t = 1: p = 1 - 1/sqrt(3); a NaN seed is left out
    result = longtail.paired_comparison([0.80, math.nan, 0.65, 0.90], [0.70, 0.50, 0.70, 0.80])
    assert result["mean"] == pytest.approx(0.05)
    assert result["std"] == pytest.approx(math.sqrt(0.0075))
    assert result["p_value"] == pytest.approx(1 - 1 / math.sqrt(3))
    assert (result["wins"], result["losses"], result["n"]) == (2, 1, 3)


def test_paired_comparison_without_a_test():
    same = longtail.paired_comparison([0.5, 0.6], [0.5, 0.6])
    assert same["p_value"] is None and same["mean"] == 0 and (same["wins"], same["losses"]) == (0, 0)
    constant = longtail.paired_comparison([0.3, 0.4], [0.1, 0.2])  # differences without spread
    assert constant["p_value"] is None and constant["wins"] == 2
    one = longtail.paired_comparison([0.9], [0.1])
    assert one["p_value"] is None and one["std"] is None and one["mean"] == pytest.approx(0.8)


def test_summary_pairs_runs_by_seed():
    ce = {0: 0.70, 1: 0.70, 2: 0.80}
    blv = {2: 0.90, 0: 0.80, 1: 0.75}  # listed out of seed order
    runs = [{"method": "ce", "seed": s, "metrics": {"balanced_acc": v}, "train_acc": 1.0} for s, v in ce.items()]
    runs += [
        {"method": "blv-abs-6", "seed": s, "metrics": {"balanced_acc": v}, "train_acc": 1.0} for s, v in blv.items()
    ]
    summary = longtail.summarize(runs, longtail.parse_methods("blv-abs-6", ()))
    assert summary["ce"]["metrics"]["balanced_acc"]["mean"] == pytest.approx(0.7333333333)
    assert summary["blv-abs-6"]["vs_ce"]["balanced_acc"]["p_value"] == pytest.approx(1 - 5 / math.sqrt(27))
    assert summary["blv-abs-6"]["vs_ce"]["balanced_acc"]["wins"] == 3


def test_frequency_groups():
    assert longtail.frequency_groups([5, 100, 1, 20, 50, 2, 10]) == {
        "many": [1, 4], "medium": [0, 3, 6], "few": [2, 5]
    }  # fmt: skip
    assert longtail.frequency_groups([3, 3, 3]) == {"many": [0], "medium": [1], "few": [2]}  # ties: class order
    assert longtail.frequency_groups([10, 1]) == {"many": [0], "medium": [], "few": [1]}
    ten = longtail.frequency_groups(list(range(10, 0, -1)))
    assert ten == {"many": [0, 1, 2], "medium": [3, 4, 5, 6], "few": [7, 8, 9]}


def test_confusion_matrix_leaves_out_ignored_positions():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    predicted = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    confusion = longtail.confusion_matrix(predicted, target, 3, 255)
    torch.testing.assert_close(confusion, torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 1]]))
    with pytest.raises(longtail.UsageError, match="outside"):
        longtail.confusion_matrix(predicted, target, 3, -100)


def test_metrics_from_confusion_known_answers():
    confusion = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 1]])  # rows: true class, columns: predicted
    result = longtail.metrics_from_confusion(confusion, longtail.frequency_groups([100, 10, 1]))
    expected = {
        "overall_acc": 4 / 6, "balanced_acc": 2 / 3, "many_acc": 1 / 2, "medium_acc": 1.0, "few_acc": 1 / 2,
        # IoU = TP / (TP + FP + FN): class 0 1/3, class 1 2/3, class 2 1/2
        "miou": 1 / 2, "many_iou": 1 / 3, "medium_iou": 2 / 3, "few_iou": 1 / 2,
        "few_share": 1 / 6, "few_share_true": 2 / 6,  # one prediction of class 2, two test positions of it
    }  # fmt: skip
    assert result["metrics"] == pytest.approx(expected)
    assert result["per_class_acc"] == pytest.approx([1 / 2, 1, 1 / 2])
    assert result["per_class_iou"] == pytest.approx([1 / 3, 2 / 3, 1 / 2])


def test_metrics_leave_out_a_class_absent_from_the_test_set():
    confusion = torch.tensor([[2, 0, 0], [0, 0, 0], [1, 0, 1]])  # class 1: no test position, never predicted
    metrics = longtail.metrics_from_confusion(confusion, longtail.frequency_groups([100, 10, 1]))["metrics"]
    assert metrics["balanced_acc"] == pytest.approx(3 / 4)  # mean of 1 and 1/2
    assert metrics["miou"] == pytest.approx(7 / 12)  # mean of 2/3 and 1/2
    assert math.isnan(metrics["medium_acc"]) and math.isnan(metrics["medium_iou"])
    assert longtail.json_safe({"a": [math.nan, 1.0]}) == {"a": [None, 1.0]}


# ---------------------------------------------------------------------------------------------
# E[v] and the training losses


@pytest.mark.parametrize("mode", ["abs", "clamp"])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 4.0, 6.0])
def test_expected_variation_matches_the_variation_stream(sigma, mode):
    v = variation((4096, 128), sigma, seed=2024, mode=mode).double()
    standard_error = v.std().item() / math.sqrt(v.numel())
    assert abs(v.mean().item() - longtail.expected_variation(sigma, mode)) < 5 * standard_error


@pytest.mark.parametrize("sigma", [0.1, 1.0, 4.0, 6.0, 50.0])
def test_expected_variation_is_the_integral(sigma):
    from scipy.integrate import quad

    integral, _ = quad(lambda x: 1 - math.erf(x / (sigma * math.sqrt(2))), 0, 1, epsabs=1e-14)
    assert longtail.expected_variation(sigma, "abs") == pytest.approx(integral, rel=1e-10)
    assert longtail.expected_variation(sigma, "clamp") == pytest.approx(integral / 2, rel=1e-10)


def test_expected_variation_limits():
    assert longtail.expected_variation(0.0, "abs") == 0.0
    # far below the clamp at 1, v = |eps| is half-normal, with mean sigma * sqrt(2 / pi)
    assert longtail.expected_variation(0.01, "abs") == pytest.approx(0.01 * math.sqrt(2 / math.pi), rel=1e-9)
    assert longtail.expected_variation(1e6, "abs") == pytest.approx(1.0, abs=1e-6)  # every v clamped to 1


def test_logit_adjustment_and_control_losses_known_answers():
    counts = [3, 1]  # prior (3/4, 1/4)
    zeros = torch.zeros(2, 2)
    la = longtail.make_training_loss(longtail.parse_method("la"), counts, -100, 0, "cpu")
    # softmax(log prior) = prior: the loss of zero logits is -log p_target
    torch.testing.assert_close(la(zeros, torch.tensor([0, 1]), 0), torch.tensor((math.log(4 / 3) + math.log(4)) / 2))
    # f = (log 4/3, log 4), w = f / log 4: the control's logits are m * w, so for target 0 the loss is
    # log(1 + exp(m * (w_1 - w_0))) with w_1 - w_0 = log 3 / log 4
    m = longtail.expected_variation(6.0, "abs")
    shift = longtail.make_training_loss(longtail.parse_method("shift-abs-6"), counts, -100, 0, "cpu")
    expected = math.log1p(math.exp(m * math.log(3) / math.log(4)))
    torch.testing.assert_close(shift(zeros[:1], torch.tensor([0]), 0), torch.tensor(expected))
    # segmentation logits (N, C, H, W) with ignored positions: the mean over the labelled ones
    target = torch.tensor([[[0, 255], [1, 0]]])
    expected = (2 * math.log(4 / 3) + math.log(4)) / 3
    la_seg = longtail.make_training_loss(longtail.parse_method("la"), counts, 255, 0, "cpu")
    torch.testing.assert_close(la_seg(torch.zeros(1, 2, 2, 2), target, 0), torch.tensor(expected))


def test_sigma_schedule_rises_then_falls_to_zero(rng):
    logits = torch.randn(64, 5, generator=rng)
    target = torch.randint(0, 5, (64,), generator=rng)
    plain = F.cross_entropy(logits, target)
    loss = longtail.make_training_loss(longtail.parse_method("blv-abs-6-sched"), [50, 20, 8, 3, 1], -100, 100, "cpu")
    torch.testing.assert_close(loss(logits, target, 0), plain)  # sigma 0: no variation
    torch.testing.assert_close(loss(logits, target, 100), plain)
    assert not torch.allclose(loss(logits, target, 50), plain)  # sigma 6 at mid-training
    constant = longtail.make_training_loss(longtail.parse_method("blv-abs-6"), [50, 20, 8, 3, 1], -100, 0, "cpu")
    assert not torch.allclose(constant(logits, target, 0), plain)


def test_method_names():
    methods = longtail.parse_methods("blv-abs-6.0, la-1,blv-clamp-4-sched,shift-abs-6,la-0.5,blv-abs-6", ())
    assert [m.name for m in methods] == ["ce", "blv-abs-6", "la", "blv-clamp-4-sched", "shift-abs-6", "la-0.5"]
    assert methods[3] == longtail.Method("blv", sigma=4.0, mode="clamp", schedule=True)
    assert methods[5].tau == 0.5


def test_long_tailed_counts():
    assert longtail.long_tailed_counts(10, 120, 100) == [120, 72, 43, 26, 15, 9, 6, 3, 2, 1]
    assert longtail.long_tailed_counts(3, 10, 1000) == [10, 1, 1]  # never below one


def test_scenes_are_long_tailed():
    _, labels = longtail.make_scenes(256, np.random.default_rng(0))
    labelled = labels[labels != 255]
    share = torch.bincount(labelled, minlength=6).double() / labelled.numel()
    assert 0.8 < share[0] < 0.9 and share[5] < 0.01
    assert torch.all(share[1:-1] > share[2:])  # the shape classes in order of frequency
    assert 0 < (labels == 255).double().mean() < 0.25  # boundaries


# ---------------------------------------------------------------------------------------------
# The user hook


class RecordingModel(nn.Module):
    """A linear classifier that keeps its initial weights and every training batch it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 3)
        self.initial = [p.detach().clone() for p in self.parameters()]
        self.batches = []

    def forward(self, x):
        if self.training:
            self.batches.append(x.clone())
        return self.linear(x)


TOY_MODELS: list[RecordingModel] = []  # every model the toy task built, in order


def make_toy_task(seed):
    """Three Gaussian blobs in 2-D, 40/12/4 training points, through torch's DataLoader; one split for every seed."""
    generator = torch.Generator().manual_seed(1234)
    centres = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])

    def sample(per_class):
        labels = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
        return centres[labels] + 0.8 * torch.randn(len(labels), 2, generator=generator), labels

    def make_model():
        TOY_MODELS.append(RecordingModel())
        return TOY_MODELS[-1]

    return {
        "train_loader": DataLoader(TensorDataset(*sample([40, 12, 4])), batch_size=8, shuffle=True),
        "test_loader": DataLoader(TensorDataset(*sample([20, 20, 20])), batch_size=32),
        "num_classes": 3,
        "class_counts": [40, 12, 4],
        "make_model": make_model,
        "epochs": 3,
        "lr": 0.05,
    }


def test_user_task_runs_with_paired_seeds(tmp_path):
    TOY_MODELS.clear()
    threads = torch.get_num_threads()
    spec = f"{__name__}:make_toy_task"
    argv = ["--task", spec, "--methods", "blv-abs-6-sched,shift-abs-6,la", "--seeds", "2"]
    assert longtail.main([*argv, "--out", str(tmp_path), "--no-plot"]) == 0
    assert torch.get_num_threads() == threads  # --threads (default 1) holds for the run only
    result = json.loads((tmp_path / "longtail.json").read_text())["tasks"][spec]
    assert result["kind"] == "classification" and result["epochs"] == 3
    assert list(result["methods"]) == ["ce", "blv-abs-6-sched", "shift-abs-6", "la"]
    assert len(result["runs"]) == 8 and result["splits"][0]["class_counts"] == [40, 12, 4]
    assert len(TOY_MODELS) == 8  # a fresh model per seed and method: seed 0's four, then seed 1's
    for seed_models in (TOY_MODELS[:4], TOY_MODELS[4:]):
        first = seed_models[0]
        assert len(first.batches) == 3 * 7  # 3 epochs of 56 points in batches of 8
        assert not torch.equal(first.batches[0], first.batches[7])  # each epoch reshuffles
        for model in seed_models[1:]:  # every method: the same initialisation and batch order
            for a, b in zip(model.initial, first.initial, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            for a, b in zip(model.batches, first.batches, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(TOY_MODELS[0].initial[0], TOY_MODELS[4].initial[0])  # seeds differ
    assert not torch.equal(TOY_MODELS[0].batches[0], TOY_MODELS[4].batches[0])


# ---------------------------------------------------------------------------------------------
# Bad input


def make_task_without_a_model(seed):
    task = make_toy_task(seed)
    del task["make_model"]
    return task


def make_task_with_a_zero_count(seed):
    return {**make_toy_task(seed), "class_counts": [56, 0, 0]}


def make_task_that_raises(seed):
    raise RuntimeError("no data here")


def make_task_with_the_wrong_model(seed):
    return {**make_toy_task(seed), "make_model": lambda: nn.Linear(2, 5)}


def make_task_with_a_bad_label(seed):
    inputs, labels = torch.zeros(4, 2), torch.tensor([0, 1, 2, 3])  # class 3 of 3 classes
    return {**make_toy_task(seed), "train_loader": DataLoader(TensorDataset(inputs, labels), batch_size=4)}


def make_task_with_float_targets(seed):
    inputs, labels = torch.zeros(4, 2), torch.tensor([0.9, 1.9, 0.0, 2.0])  # .long() read 0.9 as class 0
    return {**make_toy_task(seed), "train_loader": DataLoader(TensorDataset(inputs, labels), batch_size=4)}


def make_task_with_float_test_targets(seed):
    inputs, labels = torch.zeros(4, 2), torch.tensor([0.0, 1.0, 2.0, 1.5])
    return {**make_toy_task(seed), "test_loader": DataLoader(TensorDataset(inputs, labels), batch_size=4)}


def make_task_with_an_infinite_lr(seed):
    return {**make_toy_task(seed), "lr": float("inf")}  # it trained and printed a table


def make_task_with_a_nan_lr(seed):
    return {**make_toy_task(seed), "lr": float("nan")}  # a traceback from Adam


def make_task_with_an_lr_past_float(seed):
    return {**make_toy_task(seed), "lr": 10**400}


def make_task_with_a_zero_lr(seed):
    return {**make_toy_task(seed), "lr": 0}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "0"], "--seeds: must be an integer >= 1, got 0"),
        (["--epochs", "x"], "--epochs: expected an integer, got 'x'"),
        (["--imbalance", "0.5"], "--imbalance must be a number >= 1"),
        (["--methods", "ce,focal"], "unknown method 'focal'"),
        (["--methods", "blv-abs"], "unknown method 'blv-abs'"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--device", "meta"], "error: --device meta: the benchmarks run on cpu or cuda"),
        (["--task", "cifar"], "--task 'cifar': give digits or segmentation, or module:function"),
        (["--task", "no_such_module_here:make_task"], "cannot import no_such_module_here"),
        (["--task", f"{__name__}:no_such_function"], "has no function no_such_function"),
        (["--task", f"{__name__}:make_task_without_a_model"], "the task has no make_model"),
        (["--task", f"{__name__}:make_task_with_a_zero_count"], "class_counts must hold 3 positive training counts"),
        (["--task", f"{__name__}:make_task_that_raises"], "make_task_that_raises(0) raised RuntimeError: no data"),
        (["--task", f"{__name__}:make_task_with_the_wrong_model"], "logits of shape (8, 5): expected (N, 3, ...)"),
        (["--task", f"{__name__}:make_task_with_a_bad_label"], "a target is outside [0, 3)"),
        (
            ["--task", f"{__name__}:make_task_with_float_targets"],
            "the targets are torch.float32: class indices must be integers",
        ),
        (
            ["--task", f"{__name__}:make_task_with_float_test_targets"],
            "the targets are torch.float32: class indices must be integers",
        ),
        (["--task", f"{__name__}:make_task_with_an_infinite_lr"], "lr must be a finite number > 0, got inf"),
        (["--task", f"{__name__}:make_task_with_a_nan_lr"], "lr must be a finite number > 0, got nan"),
        (["--task", f"{__name__}:make_task_with_an_lr_past_float"], "lr must be a finite number > 0, got 1000"),
        (["--task", f"{__name__}:make_task_with_a_zero_lr"], "lr must be a finite number > 0, got 0"),
        # float() of 400 digits is inf: it ran a method "la-inf"; a sigma past BLV's bound was a traceback
        (["--methods", "la-" + "1" * 400], f"--methods: method 'la-{'1' * 400}': TAU must be a finite number"),
        (
            ["--methods", "blv-abs-1" + "0" * 38],
            f"--methods: method 'blv-abs-1{'0' * 38}': SIGMA must be a number in [0, 1e+37]",
        ),
        (["--methods", "shift-clamp-1" + "0" * 38], "SIGMA must be a number in [0, 1e+37]"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(argv, message, tmp_path, capsys):
    assert longtail.main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m benchmarks.longtail: error: ")
    assert message in err
    assert not (tmp_path / "out" / "longtail.json").exists()


def test_methods_take_what_blv_takes():
    assert longtail.parse_method("blv-clamp-1" + "0" * 37).sigma == 1e37  # blv_kernels.noise.SIGMA_MAX
    assert longtail.parse_method("la-" + "9" * 300).tau == float("9" * 300)
    assert longtail.parse_method("shift-abs-0").sigma == 0


@pytest.mark.parametrize(
    "out, message",
    [
        ("results.txt", "exists and is not a directory"),
        ("results.txt/run", "not a writable directory (Not a directory)"),
    ],
)
def test_unusable_out_is_refused_before_any_work(out, message, tmp_path, capsys, monkeypatch):
    def work(*args):
        raise AssertionError("a task was made with an --out that cannot be written to")

    monkeypatch.setattr(longtail, "resolve_task", work)
    path = tmp_path / "results.txt"
    path.write_text("keep me")
    assert longtail.main(["--out", str(tmp_path / out)]) == 2
    assert capsys.readouterr().err == f"python -m benchmarks.longtail: error: --out {tmp_path / out}: {message}\n"
    assert path.read_text() == "keep me"


@pytest.mark.parametrize(
    ("module", "hint"), [("sklearn", "pip install scikit-learn"), ("scipy.stats", "pip install scipy")]
)
def test_missing_package_gives_an_install_hint(module, hint, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    assert longtail.main(["--task", "digits", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and hint in err
    assert not any(tmp_path.iterdir())


def test_command_line_error_has_no_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.longtail", "--seeds", "0"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr == "python -m benchmarks.longtail: error: argument --seeds: must be an integer >= 1, got 0\n"
