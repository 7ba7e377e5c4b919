"""Long-tail evaluation: does BLV help the rare classes of *your* task? Paired seeds, CE as the baseline.

    python -m benchmarks.longtail [--out DIR] [--task NAME ...] [--methods LIST] [--seeds N] [--epochs N]

Trains the same model with plain cross-entropy, BLV (``BLVLoss``: constant sigma or the
``SigmaSchedule``, modes "abs" and "clamp"), a no-noise control and logit adjustment, and
compares them on the classes a long-tailed training set starves. Paired seeds: for a given
seed every method sees the same data split, initialisation and batch order (the loop calls
``torch.manual_seed(seed)`` before ``make_model()`` and reseeds torch's global generator
before every epoch's pass over ``train_loader``), so only the loss differs. Reports, per
method, the mean and std over seeds of overall, balanced and many/medium/few-shot accuracy
(and IoU), the share of test predictions in the few-shot classes, and the paired difference
against cross-entropy (mean, std, two-sided paired t-test, seeds where the method is better).
Writes ``longtail.json`` (every per-seed number, the summary, the command, the environment)
and ``longtail.png`` (per-class test accuracy against training class frequency) to DIR.

Built-in tasks (the default runs both, about two minutes on a 2-core CPU):

- ``digits``: scikit-learn's ``load_digits`` (ships with scikit-learn, no download), a
  long-tailed training split ``n_c = 120 * imbalance**(-c / 9)`` (at least 1; class 0 the
  most frequent; which digit gets which frequency is drawn per seed), a balanced test split
  of 50 per class, an MLP 64-128-128-10, Adam.
- ``segmentation``: synthetic 32x32 scenes, background about 85% of the pixels and five
  shape classes down to 0.4%, shapes coloured near their class colour (neighbouring classes
  overlap, so the prior matters), class boundaries (about 17% of the pixels) labelled 255
  and ignored; a small dilated FCN. New scenes per seed.

Methods (``--methods``, comma-separated; ``ce`` is always run, as the baseline):

- ``ce``: plain cross-entropy.
- ``blv-MODE-SIGMA`` and ``blv-MODE-SIGMA-sched``: ``BLVLoss(counts, sigma=SIGMA, mode=MODE)``
  in train mode; ``-sched`` sets sigma from ``SigmaSchedule`` every step: 0 rising to SIGMA
  at mid-training, then back to 0 at the end.
- ``shift-MODE-SIGMA``: the no-noise control, ``CE(logits + E[v] * w_c)`` in training only,
  with ``E[v]`` exact for the mode and sigma (:func:`expected_variation`). BLV's shift
  ``v * w_c`` averages to this; since ``w_c = -log(p_c) / max f``, it is logit adjustment
  with the negative temperature ``tau = -E[v] / max f``.
- ``la`` or ``la-TAU``: logit adjustment (Menon et al., "Long-tail learning via logit
  adjustment", ICLR 2021, the logit-adjusted loss): train on ``logits + TAU * log(p_c)``
  (TAU = 1 by default), predict with the plain logits.

Your own model and data (``--task my_module:make_task``, importable from the current
directory): ``make_task(seed)`` is called once per seed and returns an object or dict with

- ``train_loader``, ``test_loader``: iterables of ``(inputs, targets)`` batches, iterated
  once per epoch (``train_loader`` needs ``len()`` for the ``-sched`` methods); targets are
  class indices, ``(N,)`` for classification or ``(N, H, W)`` for segmentation;
- ``num_classes``; ``class_counts``: training samples (or pixels) per class, none zero;
- ``make_model()``: a fresh, randomly initialised model giving ``(N, num_classes, ...)`` logits;
- optional: ``epochs`` (default 10), ``lr`` (Adam's, default 1e-3), ``ignore_index``
  (default -100), ``description``.

Example (``my_task.py``)::

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    def make_task(seed):
        x_train, y_train, x_test, y_test = load_my_data()  # yours; the seed may draw the split
        return {
            "train_loader": DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True),
            "test_loader": DataLoader(TensorDataset(x_test, y_test), batch_size=256),
            "num_classes": 10,
            "class_counts": torch.bincount(y_train, minlength=10).tolist(),
            "make_model": lambda: torch.nn.Linear(x_train.shape[1], 10),
            "epochs": 20,
        }

then ``python -m benchmarks.longtail --task my_task:make_task --seeds 5 --out results/``.
A ``DataLoader(shuffle=True)`` without its own generator draws its order from the reseeded
global generator, so it keeps the seeds paired; one with its own generator must reseed it.
Needs scipy (the t-test); the digits task needs scikit-learn; the plot needs matplotlib. Bad
input (an unknown task or method, ``--seeds 0``, a task without a field, a model giving the
wrong number of classes, ...) is one line on stderr and exit status 2, with nothing written.
Torch runs on one CPU thread unless ``--threads`` says more: the built-in models are small,
and on a busy CPU their threads wait on each other (ten times slower with two threads on two
shared cores); raise it for a large model of your own on the CPU.
"""

from __future__ import annotations

import argparse
import importlib
import math
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from blv_kernels import BLVLoss, class_weights
from blv_kernels.integrations import SigmaSchedule
from blv_kernels.noise import SIGMA_MAX

from .common import (
    ArgumentParser,
    UsageError,
    add_threads_argument,
    at_least,
    command,
    environment,
    out_dir_problem,
    resolve_device,
    stamp_line,
    torch_threads,
    write_json,
)
from .plots import pyplot

PROG = "python -m benchmarks.longtail"
BUILTIN_TASKS = ("digits", "segmentation")
DIGITS_METHODS = (
    "ce", "la",
    "blv-abs-1", "blv-abs-4", "blv-abs-6", "shift-abs-1", "shift-abs-4", "shift-abs-6",
    "blv-abs-1-sched", "blv-abs-4-sched", "blv-abs-6-sched",
    "blv-clamp-1", "blv-clamp-4", "blv-clamp-6", "shift-clamp-1", "shift-clamp-4", "shift-clamp-6",
    "blv-clamp-1-sched", "blv-clamp-4-sched", "blv-clamp-6-sched",
)  # fmt: skip
SEGMENTATION_METHODS = ("ce", "la", "blv-abs-4", "blv-abs-6", "shift-abs-6")
USER_TASK_METHODS = ("ce", "la", "blv-abs-4", "blv-abs-6", "blv-abs-6-sched", "blv-clamp-6", "shift-abs-6")
DEFAULT_SEEDS = {"digits": 10, "segmentation": 8}
USER_TASK_SEEDS = 5
USER_TASK_EPOCHS = 10
USER_TASK_LR = 1e-3

# Metrics per kind of task: the table's columns, then the paired differences printed against CE.
# The noise level is the seed-to-seed std of CE's first headline metric.
COLUMNS = {
    "classification": ("overall_acc", "balanced_acc", "many_acc", "medium_acc", "few_acc", "few_share"),
    "segmentation": ("overall_acc", "miou", "many_iou", "medium_iou", "few_iou", "few_share"),
}
HEADLINE = {
    "classification": ("balanced_acc", "few_acc", "few_share"),
    "segmentation": ("miou", "few_iou", "few_share"),
}
LABELS = {
    "overall_acc": "acc", "balanced_acc": "bal acc", "many_acc": "many", "medium_acc": "medium", "few_acc": "few",
    "miou": "mIoU", "many_iou": "many IoU", "medium_iou": "med IoU", "few_iou": "few IoU", "few_share": "few-share",
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Methods


def expected_variation(sigma: float, mode: str) -> float:
    """``E[v]``, the mean of BLV's variation ``v`` (the logit shift per unit of ``w_c``).

    abs mode, ``v = min(|eps|, 1)`` with ``eps ~ N(0, sigma^2)`` and ``b = sigma * sqrt(2)``:

        E[v] = int_0^1 P(|eps| > x) dx = int_0^1 (1 - erf(x / b)) dx
             = 1 - erf(1 / b) + b / sqrt(pi) * (1 - exp(-1 / b^2))      (erf integrated by parts)

    clamp mode, ``v = clamp(eps, 0, 1)``: ``v = 0`` when ``eps <= 0`` (probability 1/2), and
    otherwise ``v`` is distributed as in abs mode, so ``E[v]`` is half of it.
    """
    if mode not in ("abs", "clamp"):
        raise ValueError(f"mode must be 'abs' or 'clamp', got {mode!r}")
    if sigma == 0:
        return 0.0
    b = sigma * math.sqrt(2.0)
    abs_mean = 1.0 - math.erf(1.0 / b) + b / math.sqrt(math.pi) * (1.0 - math.exp(-1.0 / b**2))
    return abs_mean if mode == "abs" else abs_mean / 2


_NUMBER = r"(\d+(?:\.\d*)?)"
METHOD_PATTERNS = {
    "ce": re.compile(r"ce"),
    "la": re.compile(rf"la(?:-{_NUMBER})?"),
    "blv": re.compile(rf"blv-(abs|clamp)-{_NUMBER}(-sched)?"),
    "shift": re.compile(rf"shift-(abs|clamp)-{_NUMBER}"),
}
METHOD_GRAMMAR = "ce, la[-TAU], blv-{abs,clamp}-SIGMA[-sched], shift-{abs,clamp}-SIGMA"


@dataclass(frozen=True)
class Method:
    """One training loss of the comparison; :func:`parse_method` reads it from its name."""

    kind: str  # "ce", "la", "blv" or "shift"
    sigma: float = 0.0
    mode: str = "abs"
    schedule: bool = False
    tau: float = 1.0

    @property
    def name(self) -> str:
        if self.kind in ("blv", "shift"):
            return f"{self.kind}-{self.mode}-{self.sigma:g}" + ("-sched" if self.schedule else "")
        if self.kind == "la" and self.tau != 1:
            return f"la-{self.tau:g}"
        return self.kind

    def describe(self) -> str:
        if self.kind == "ce":
            return "plain cross-entropy"
        if self.kind == "la":
            return (
                f"logit adjustment (Menon et al. 2021): CE(logits + {self.tau:g} * log prior) in training, "
                "plain logits at test"
            )
        mean = expected_variation(self.sigma, self.mode)
        if self.kind == "shift":
            return f"no-noise control: CE(logits + E[v] * w_c) in training, E[v] = {mean:.4f} (BLV {self.name[6:]})"
        if self.schedule:
            return f"BLVLoss(mode={self.mode!r}), sigma 0 -> {self.sigma:g} at mid-training -> 0 (SigmaSchedule)"
        return f"BLVLoss(sigma={self.sigma:g}, mode={self.mode!r}), E[v] = {mean:.4f}"


def parse_method(name: str) -> Method:
    for kind, pattern in METHOD_PATTERNS.items():
        match = pattern.fullmatch(name)
        if match is None:
            continue
        if kind == "la":
            tau = 1.0 if match[1] is None else float(match[1])
            if not math.isfinite(tau):  # float() of a few hundred digits is inf
                raise UsageError(f"--methods: method {name!r}: TAU must be a finite number")
            return Method("la", tau=tau)
        if kind in ("blv", "shift"):
            sigma = float(match[2])
            if sigma > SIGMA_MAX:  # BLVLoss's bound (the pattern admits no sign)
                raise UsageError(f"--methods: method {name!r}: SIGMA must be a number in [0, {SIGMA_MAX:g}]")
            return Method(kind, sigma=sigma, mode=match[1], schedule=kind == "blv" and match[3] is not None)
        return Method("ce")
    raise UsageError(f"--methods: unknown method {name!r}; methods are {METHOD_GRAMMAR} (for example blv-abs-6-sched)")


def parse_methods(text: str | None, default: Sequence[str]) -> list[Method]:
    """The methods to run, CE first (the baseline of every comparison), each once."""
    names = default if text is None else [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UsageError("--methods: no method given")
    methods = [Method("ce")] + [parse_method(name) for name in names]
    return list({m.name: m for m in methods}.values())


TrainingLoss = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (logits, target, step) -> loss


def per_class(offset: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """A per-class vector shaped to broadcast along dim 1 of ``(N, C, ...)`` logits."""
    return offset.view(1, -1, *([1] * (logits.dim() - 2)))


def make_training_loss(method: Method, class_counts, ignore_index: int, total_steps: int, device) -> TrainingLoss:
    if method.kind == "blv":
        criterion = BLVLoss(class_counts, sigma=method.sigma, mode=method.mode, ignore_index=ignore_index)
        criterion = criterion.to(device).train()  # train mode: the variation is on
        if not method.schedule:
            return lambda logits, target, step: criterion(logits, target)
        schedule = SigmaSchedule(sigma_0=method.sigma, t_mid=total_steps // 2, t_end=total_steps)

        def blv_loss(logits, target, step):
            criterion.sigma = schedule(step)
            return criterion(logits, target)

        return blv_loss
    # CE, the control and logit adjustment: cross-entropy of logits plus a fixed per-class offset
    if method.kind == "shift":
        offset = expected_variation(method.sigma, method.mode) * class_weights(class_counts)
    elif method.kind == "la":
        counts = torch.as_tensor(class_counts, dtype=torch.float64)
        offset = (method.tau * torch.log(counts / counts.sum())).float()
    else:
        offset = torch.zeros(len(class_counts))
    offset = offset.to(device)
    return lambda logits, target, step: F.cross_entropy(
        logits + per_class(offset, logits), target, ignore_index=ignore_index
    )


# ---------------------------------------------------------------------------------------------
# Tasks


@dataclass
class Task:
    """What a run needs from a task; ``make_task(seed)`` returns its fields (see the module docstring)."""

    train_loader: Iterable
    test_loader: Iterable
    num_classes: int
    class_counts: list[float]
    make_model: Callable[[], nn.Module]
    epochs: int = USER_TASK_EPOCHS
    lr: float = USER_TASK_LR
    ignore_index: int = -100
    description: str = ""


class Batches:
    """Mini-batches of in-memory tensors; shuffled from torch's global generator on every pass."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, *, shuffle: bool) -> None:
        self.inputs, self.targets, self.batch_size, self.shuffle = inputs, targets, batch_size, shuffle

    def __len__(self) -> int:
        return math.ceil(len(self.targets) / self.batch_size)

    def __iter__(self):
        n = len(self.targets)
        order = torch.randperm(n) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.inputs[index], self.targets[index]


DIGITS_MAX_PER_CLASS = 120  # load_digits has >= 174 images per class: 50 for test, up to 120 for training
DIGITS_TEST_PER_CLASS = 50


def long_tailed_counts(num_classes: int, n_max: int, imbalance: float) -> list[int]:
    """Exponential imbalance ``n_c = n_max * imbalance**(-c / (C - 1))``, rounded, at least 1."""
    return [max(1, round(n_max * imbalance ** (-c / (num_classes - 1)))) for c in range(num_classes)]


def make_digits_task(seed: int, *, imbalance: float = 100.0) -> Task:
    from sklearn.datasets import load_digits

    images, digits = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    digit_of_class = rng.permutation(10)  # class c (c-th most frequent) is this digit
    counts = long_tailed_counts(10, DIGITS_MAX_PER_CLASS, imbalance)
    train, test = [], []
    for c, digit in enumerate(digit_of_class):
        index = rng.permutation(np.flatnonzero(digits == digit))
        test.append(index[:DIGITS_TEST_PER_CLASS])
        train.append(index[DIGITS_TEST_PER_CLASS : DIGITS_TEST_PER_CLASS + counts[c]])
    inputs = torch.tensor(images / 16.0, dtype=torch.float32)  # pixel values 0..16
    labels = torch.as_tensor(np.argsort(digit_of_class)[digits])  # digit -> its class

    def split(parts):
        index = torch.as_tensor(np.concatenate(parts))
        return inputs[index], labels[index]

    return Task(
        train_loader=Batches(*split(train), batch_size=64, shuffle=True),
        test_loader=Batches(*split(test), batch_size=1000, shuffle=False),
        num_classes=10,
        class_counts=counts,
        make_model=lambda: nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        ),
        epochs=40,  # 200 Adam steps: training accuracy reaches 100%
        lr=3e-3,
        description=(
            f"load_digits, long-tailed training split (imbalance {imbalance:g}: {counts[0]} ... {counts[-1]} images "
            f"per class), balanced test split ({DIGITS_TEST_PER_CLASS} per class); MLP 64-128-128-10, Adam"
        ),
    )


SCENE_SIZE = 32
SEGMENTATION_IGNORE_INDEX = 255
# Background, then five shape classes with long-tailed frequencies: the mean number of shapes of
# each class per scene (Poisson), and its colour (RGB). Neighbouring colours are 0.7-1 apart and a
# shape's colour scatters around its class's by COLOUR_JITTER: some shapes are ambiguous, and the
# prior decides them.
SHAPES_PER_SCENE = (3.0, 1.5, 0.75, 0.35, 0.15)
CLASS_COLOURS = ((0, 0, 0), (1, 0, 0), (0.7, 0.7, 0), (0, 1, 0), (0, 0.7, 0.7), (0, 0, 1))
COLOUR_JITTER = 0.25
PIXEL_NOISE = 0.3


def make_scenes(num_scenes: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy RGB scenes with discs and rectangles (radius 2-5.5 px) and their labels, boundaries ignored."""
    colours = np.array(CLASS_COLOURS, dtype=np.float32)
    colour_map = np.broadcast_to(colours[0][:, None, None], (num_scenes, 3, SCENE_SIZE, SCENE_SIZE)).copy()
    labels = np.zeros((num_scenes, SCENE_SIZE, SCENE_SIZE), dtype=np.int64)
    y, x = np.mgrid[:SCENE_SIZE, :SCENE_SIZE]
    shapes = rng.poisson(SHAPES_PER_SCENE, size=(num_scenes, len(SHAPES_PER_SCENE)))
    for scene, count in enumerate(shapes):
        for c, number in enumerate(count, start=1):
            for _ in range(number):
                radius = rng.uniform(2.0, 5.5)
                cy, cx = rng.uniform(0, SCENE_SIZE, size=2)
                if rng.random() < 0.5:
                    mask = (y - cy) ** 2 + (x - cx) ** 2 <= radius**2
                else:
                    mask = (np.abs(y - cy) <= radius) & (np.abs(x - cx) <= 0.8 * radius)
                colour = colours[c] + COLOUR_JITTER * rng.standard_normal(3)
                colour_map[scene][:, mask] = colour[:, None]  # a later shape covers an earlier one
                labels[scene][mask] = c
    images = colour_map + PIXEL_NOISE * rng.standard_normal(colour_map.shape)
    # a pixel with a 4-neighbour of another class is a boundary: ignored, as in VOC-style labels
    padded = np.pad(labels, ((0, 0), (1, 1), (1, 1)), mode="edge")
    neighbours = (padded[:, :-2, 1:-1], padded[:, 2:, 1:-1], padded[:, 1:-1, :-2], padded[:, 1:-1, 2:])
    boundary = np.any([n != labels for n in neighbours], axis=0)
    labels[boundary] = SEGMENTATION_IGNORE_INDEX
    return torch.from_numpy(images.astype(np.float32)), torch.from_numpy(labels)


def make_fcn(num_classes: int, width: int = 16) -> nn.Module:
    """Three 3x3 conv-BN-ReLU layers dilated 1, 2, 4 (receptive field 15 px), then a 1x1 classifier."""
    layers, channels = [], 3
    for dilation in (1, 2, 4):
        layers += [
            nn.Conv2d(channels, width, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
        channels = width
    return nn.Sequential(*layers, nn.Conv2d(width, num_classes, 1))


def make_segmentation_task(seed: int, *, num_scenes: int = 256) -> Task:
    rng = np.random.default_rng(seed)
    train_images, train_labels = make_scenes(num_scenes, rng)
    test_images, test_labels = make_scenes(num_scenes, rng)
    num_classes = len(CLASS_COLOURS)
    labelled = train_labels[train_labels != SEGMENTATION_IGNORE_INDEX]
    counts = torch.bincount(labelled, minlength=num_classes).tolist()
    if min(counts) == 0:
        raise UsageError(f"--scenes {num_scenes}: too few scenes, a class has no training pixel (counts {counts})")
    return Task(
        train_loader=Batches(train_images, train_labels, batch_size=8, shuffle=True),
        test_loader=Batches(test_images, test_labels, batch_size=64, shuffle=False),
        num_classes=num_classes,
        class_counts=counts,
        make_model=partial(make_fcn, num_classes),
        epochs=7,  # 224 Adam steps: training pixel accuracy about 98%
        lr=1e-2,
        ignore_index=SEGMENTATION_IGNORE_INDEX,
        description=(
            f"synthetic {SCENE_SIZE}x{SCENE_SIZE} scenes ({num_scenes} train, {num_scenes} test, new per seed), "
            f"background and 5 shape classes, boundaries ignored; dilated FCN (3 conv-BN-ReLU, width 16), Adam"
        ),
    )


TASK_FIELDS = ("train_loader", "test_loader", "num_classes", "class_counts", "make_model")
OPTIONAL_TASK_FIELDS = ("epochs", "lr", "ignore_index", "description")


def as_task(spec: str, value) -> Task:
    """Check what a ``make_task`` returned (an object or a dict) and make it a :class:`Task`."""
    get = value.get if isinstance(value, dict) else lambda name, default=None: getattr(value, name, default)
    missing = [name for name in TASK_FIELDS if get(name) is None]
    if missing:
        raise UsageError(f"--task {spec}: the task has no {', '.join(missing)} (needs {', '.join(TASK_FIELDS)})")
    fields = {name: get(name) for name in TASK_FIELDS + OPTIONAL_TASK_FIELDS if get(name) is not None}
    num_classes = fields["num_classes"]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise UsageError(f"--task {spec}: num_classes must be an int >= 2, got {num_classes!r}")
    try:
        counts = [float(n) for n in fields["class_counts"]]
    except (TypeError, ValueError):
        raise UsageError(f"--task {spec}: class_counts must be a sequence of numbers") from None
    if len(counts) != num_classes or not all(math.isfinite(n) and n > 0 for n in counts):
        raise UsageError(
            f"--task {spec}: class_counts must hold {num_classes} positive training counts (BLV's weights and logit "
            f"adjustment take the log of each), got {fields['class_counts']!r}"
        )
    if not callable(fields["make_model"]):
        raise UsageError(f"--task {spec}: make_model must be callable")
    epochs = fields.get("epochs", USER_TASK_EPOCHS)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0:
        raise UsageError(f"--task {spec}: epochs must be a positive number, got {epochs!r}")
    lr = fields.get("lr", USER_TASK_LR)
    # (NaN fails the comparison; an int past float's range would overflow in the optimizer)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr <= sys.float_info.max:
        raise UsageError(f"--task {spec}: lr must be a finite number > 0, got {lr!r}")
    return Task(**fields)


def resolve_task(spec: str, args) -> Callable[[int], Task]:
    """``--task`` -> a function of the seed giving a checked :class:`Task`."""
    if spec == "digits":
        try:
            import sklearn  # noqa: F401
        except ImportError:
            raise UsageError("the digits task needs scikit-learn: pip install scikit-learn") from None
        return partial(make_digits_task, imbalance=args.imbalance)
    if spec == "segmentation":
        return partial(make_segmentation_task, num_scenes=args.scenes)
    module_name, _, function_name = spec.partition(":")
    if not (module_name and function_name):
        raise UsageError(f"--task {spec!r}: give {' or '.join(BUILTIN_TASKS)}, or module:function for your own")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # whatever importing the user's module raises, it is bad input to report
        raise UsageError(f"--task {spec}: cannot import {module_name}: {type(error).__name__}: {error}") from None
    make_task = getattr(module, function_name, None)
    if not callable(make_task):
        raise UsageError(f"--task {spec}: {module_name} has no function {function_name}")

    def user_task(seed: int) -> Task:
        try:
            value = make_task(seed)
        except Exception as error:  # the user's make_task failing is a bad task: one line, not a traceback
            raise UsageError(f"--task {spec}: {function_name}({seed}) raised {type(error).__name__}: {error}") from None
        return as_task(spec, value)

    return user_task


# ---------------------------------------------------------------------------------------------
# Training and evaluation


def epoch_seed(seed: int, epoch: int) -> int:
    """The global generator's seed for one epoch of one seed: the same for every method."""
    return (seed + 1) * 1_000_000 + epoch


def train(task: Task, method: Method, seed: int, device: torch.device) -> nn.Module:
    torch.manual_seed(seed)  # the same initialisation for every method
    model = task.make_model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=task.lr)
    total_steps = task.epochs * len(task.train_loader) if method.schedule else 0
    loss_fn = make_training_loss(method, task.class_counts, task.ignore_index, total_steps, device)
    model.train()
    step = 0
    for epoch in range(task.epochs):
        torch.manual_seed(epoch_seed(seed, epoch))  # the same batch order for every method
        for inputs, targets in task.train_loader:
            check_targets(targets, task.num_classes, task.ignore_index)
            logits = model(inputs.to(device))
            check_logits(logits, task.num_classes)
            loss = loss_fn(logits, targets.to(device).long(), step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return model


def check_logits(logits: torch.Tensor, num_classes: int) -> None:
    if logits.dim() < 2 or logits.shape[1] != num_classes:
        raise UsageError(f"the model gives logits of shape {tuple(logits.shape)}: expected (N, {num_classes}, ...)")


def check_targets(targets: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    if targets.is_floating_point():  # .long() would truncate 0.9 to class 0
        raise UsageError(f"the targets are {targets.dtype}: class indices must be integers")
    labelled = targets[targets != ignore_index]
    if labelled.numel() and (labelled.min() < 0 or labelled.max() >= num_classes):
        raise UsageError(f"a target is outside [0, {num_classes}) and is not ignore_index={ignore_index}")


def confusion_matrix(predicted: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int):
    """``M[t, p]``: positions of true class t predicted as p; positions labelled ``ignore_index`` left out."""
    check_targets(target, num_classes, ignore_index)
    keep = target != ignore_index
    target, predicted = target[keep].long(), predicted[keep].long()
    return torch.bincount(target * num_classes + predicted, minlength=num_classes**2).view(num_classes, num_classes)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, task: Task, device) -> tuple[torch.Tensor, bool]:
    """The confusion matrix of the plain logits' argmax over ``loader``, and whether targets are spatial."""
    model.eval()
    confusion = torch.zeros(task.num_classes, task.num_classes, dtype=torch.int64)
    spatial = False
    for inputs, targets in loader:
        logits = model(inputs.to(device))
        check_logits(logits, task.num_classes)
        predicted = logits.argmax(1).cpu()
        confusion += confusion_matrix(predicted, targets, task.num_classes, task.ignore_index)
        spatial = targets.dim() > 1
    return confusion, spatial


def frequency_groups(class_counts: Sequence[float]) -> dict[str, list[int]]:
    """Many/medium/few-shot classes by training frequency: the C//3 most frequent, the C//3 rarest, the rest.

    (At least one class each for many and few; ties keep the class order.)
    """
    by_frequency = sorted(range(len(class_counts)), key=lambda c: -class_counts[c])
    k = max(1, len(class_counts) // 3)
    return {"many": sorted(by_frequency[:k]), "medium": sorted(by_frequency[k:-k]), "few": sorted(by_frequency[-k:])}


def _nanmean(values: torch.Tensor) -> float:
    return float(values.nanmean()) if values.numel() else math.nan


def metrics_from_confusion(confusion: torch.Tensor, groups: dict[str, list[int]]) -> dict:
    """Accuracy and IoU per class and per group, from ``M[true, predicted]``.

    Per-class accuracy is the recall ``M[c, c] / sum_p M[c, p]``; a group's accuracy and IoU are
    the means over its classes (a class absent from the test set counts as NaN and is left out).
    ``few_share`` is the share of predictions that name a few-shot class, ``few_share_true``
    the share of test positions that are one.
    """
    m = confusion.double()
    diagonal, true_totals, predicted_totals, total = m.diagonal(), m.sum(1), m.sum(0), m.sum()
    accuracy = diagonal / true_totals  # 0/0 = NaN: class absent from the test set
    iou = diagonal / (true_totals + predicted_totals - diagonal)
    few = groups["few"]
    metrics = {
        "overall_acc": float(diagonal.sum() / total),
        "balanced_acc": _nanmean(accuracy),
        "miou": _nanmean(iou),
        "few_share": float(predicted_totals[few].sum() / total),
        "few_share_true": float(true_totals[few].sum() / total),
    }
    for group, classes in groups.items():
        metrics[f"{group}_acc"] = _nanmean(accuracy[classes])
        metrics[f"{group}_iou"] = _nanmean(iou[classes])
    return {"metrics": metrics, "per_class_acc": accuracy.tolist(), "per_class_iou": iou.tolist()}


# ---------------------------------------------------------------------------------------------
# Statistics


def mean_std(values: Sequence[float]) -> dict:
    """Mean and sample std (ddof=1) of the finite values; std None for fewer than two."""
    finite = [v for v in values if _finite(v)]
    if not finite:
        return {"mean": None, "std": None, "n": 0}
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else None
    return {"mean": float(np.mean(finite)), "std": std, "n": len(finite)}


SPREAD_TOLERANCE = 1e-12  # differences equal up to float rounding have no spread: no t-test


def paired_comparison(values: Sequence[float], baseline: Sequence[float]) -> dict:
    """Method minus baseline, seed by seed: mean and std of the differences, paired t-test, wins.

    ``p_value``: two-sided, ``scipy.stats.ttest_rel`` (None for fewer than two pairs or
    differences without spread); ``wins``/``losses``: seeds where the method is better/worse.
    Seeds where either value is not finite are left out.
    """
    from scipy.stats import ttest_rel

    pairs = [(v, b) for v, b in zip(values, baseline, strict=True) if _finite(v) and _finite(b)]
    differences = np.array([v - b for v, b in pairs])
    result = {**mean_std(differences.tolist()), "p_value": None, "wins": int((differences > 0).sum()),
              "losses": int((differences < 0).sum())}  # fmt: skip
    if len(pairs) > 1 and np.ptp(differences) > SPREAD_TOLERANCE:
        result["p_value"] = float(ttest_rel([v for v, _ in pairs], [b for _, b in pairs]).pvalue)
    return result


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def summarize(runs: list[dict], methods: list[Method]) -> dict:
    """Per method: mean/std over seeds of every metric, and the paired comparison with CE."""
    by_method = {m.name: sorted((r for r in runs if r["method"] == m.name), key=lambda r: r["seed"]) for m in methods}
    baseline = by_method["ce"]
    summary = {}
    for name, rows in by_method.items():
        metrics = rows[0]["metrics"].keys()
        summary[name] = {
            "metrics": {k: mean_std([r["metrics"][k] for r in rows]) for k in metrics},
            "train_acc": mean_std([r["train_acc"] for r in rows]),
            "vs_ce": None if name == "ce" else {
                k: paired_comparison([r["metrics"][k] for r in rows], [r["metrics"][k] for r in baseline])
                for k in metrics
            },
        }  # fmt: skip
    return summary


# ---------------------------------------------------------------------------------------------
# Running a task, printing, plotting


def prepare(label: str, task: Task, methods: list[Method], epochs: int | None) -> Task:
    """Apply ``--epochs``; check what the methods need of the task."""
    if epochs is not None:
        task.epochs = epochs
    if any(m.schedule for m in methods) and not hasattr(task.train_loader, "__len__"):
        raise UsageError(f"--task {label}: the -sched methods need len(train_loader) (steps per epoch)")
    return task


def run_task(label: str, tasks: Callable[[int], Task], seeds: range, methods: list[Method], device) -> dict:
    """Train and test every method on every seed's task; the per-seed results and their summary."""
    start = time.perf_counter()
    runs, splits, kind, description, epochs = [], [], None, "", None
    for seed in seeds:
        task = tasks(seed)
        groups = frequency_groups(task.class_counts)
        splits.append({"seed": seed, "class_counts": list(task.class_counts), "groups": groups})
        description, epochs = task.description, task.epochs
        for method in methods:
            run_start = time.perf_counter()
            model = train(task, method, seed, device)
            confusion, spatial = evaluate(model, task.test_loader, task, device)
            train_confusion, _ = evaluate(model, task.train_loader, task, device)
            kind = "segmentation" if spatial else "classification"  # targets with spatial dimensions
            runs.append({
                "method": method.name, "seed": seed, **metrics_from_confusion(confusion, groups),
                "confusion": confusion.tolist(),
                "train_acc": float(train_confusion.diagonal().sum() / train_confusion.sum()),
                "seconds": time.perf_counter() - run_start,
            })  # fmt: skip
        print(f"  {label}: seed {seed + 1}/{len(seeds)} done ({time.perf_counter() - start:.0f} s)", flush=True)
    summary = summarize(runs, methods)
    noise_metric = HEADLINE[kind][0]
    return {
        "description": description,
        "kind": kind,
        "seeds": list(seeds),
        "epochs": epochs,
        "methods": {m.name: m.describe() for m in methods},
        "splits": splits,
        "runs": runs,
        "summary": summary,
        "noise_level": {"metric": noise_metric, "ce_std": summary["ce"]["metrics"][noise_metric]["std"]},
        "seconds": time.perf_counter() - start,
    }


def _points(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _mean_std(stats: dict) -> str:
    return f"{_points(stats['mean'])} ± {_points(stats['std'])}"


def aligned(rows: list[list[str]]) -> list[str]:
    """Rows of cells as text columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  "
        + "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]


def format_task(label: str, result: dict) -> str:
    """The task's two tables: every metric per method, then the paired differences with CE."""
    kind, summary, n = result["kind"], result["summary"], len(result["seeds"])
    first = result["splits"][0]
    counts = _abbreviated([f"{c:g}" for c in first["class_counts"]])
    groups = "; ".join(f"{g} = {_abbreviated(list(map(str, cs))) or 'none'}" for g, cs in first["groups"].items())
    few_share_true = _points(summary["ce"]["metrics"]["few_share_true"]["mean"])
    lines = [
        f"== {label} ({kind}): {result['description']}",
        f"paired seeds: {n}; epochs: {result['epochs']}; training counts per class (seed 0): {counts}",
        f"classes by training frequency: {groups}; few-share: test predictions in a few-shot class "
        f"(truly few-shot: {few_share_true}%)",
        "",
        "% (mean ± std over seeds)",
    ]
    rows = [["method", *(LABELS[k] for k in COLUMNS[kind]), "train acc"]]
    for method, entry in summary.items():
        rows.append([method, *(_mean_std(entry["metrics"][k]) for k in COLUMNS[kind]),
                     _points(entry["train_acc"]["mean"])])  # fmt: skip
    lines += aligned(rows)
    noise = result["noise_level"]
    lines += [
        "",
        f"paired difference with ce, points (mean ± std over seeds), two-sided paired t-test p, wins = seeds "
        f"better than ce; noise level: ce's {LABELS[noise['metric']]} std over seeds = {_points(noise['ce_std'])}",
    ]
    rows = [["method"] + [h for k in HEADLINE[kind] for h in (f"Δ {LABELS[k]}", "p", "wins")]]
    for method, entry in summary.items():
        if entry["vs_ce"] is not None:
            cells = [
                (_mean_std(d), _p(d["p_value"]), f"{d['wins']}/{d['n']}")
                for d in map(entry["vs_ce"].get, HEADLINE[kind])
            ]
            rows.append([method, *(c for triple in cells for c in triple)])
    lines += aligned(rows)
    return "\n".join(lines)


def _abbreviated(items: list[str], limit: int = 12) -> str:
    """A comma-separated list, its middle left out beyond ``limit`` items."""
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:3]) + ", ..., " + ", ".join(items[-3:]) + f" ({len(items)} in all)"


def _p(value) -> str:
    return "-" if value is None else f"{value:.2g}"


def method_style(method: Method) -> dict:
    """Line style by family: BLV abs blue, BLV clamp orange, controls purple/brown dotted, darker for larger sigma."""
    if method.kind == "ce":
        return {"color": "black", "linewidth": 2.5}
    if method.kind == "la":
        return {"color": "tab:green", "linewidth": 2.5}
    cmap = {("blv", "abs"): "Blues", ("blv", "clamp"): "Oranges", ("shift", "abs"): "Purples",
            ("shift", "clamp"): "YlOrBr"}[method.kind, method.mode]  # fmt: skip
    import matplotlib

    shade = 0.45 + 0.5 * min(method.sigma, 6.0) / 6.0
    linestyle = "--" if method.schedule else ":" if method.kind == "shift" else "-"
    return {"color": matplotlib.colormaps[cmap](shade), "linestyle": linestyle, "linewidth": 1.6}


def plot_per_class(results: dict, methods: dict[str, list[Method]], path: Path) -> str:
    """Per-class test accuracy (mean over seeds) against training class frequency, one panel per task."""
    plt = pyplot()
    if plt is None:
        return "plot skipped: matplotlib is not installed (pip install '.[bench]')"
    fig, axes = plt.subplots(1, len(results), figsize=(7.5 * len(results), 5.5), squeeze=False)
    for ax, (label, result) in zip(axes[0], results.items(), strict=True):
        counts = np.array([split["class_counts"] for split in result["splits"]], dtype=np.float64)
        frequency = (counts / counts.sum(1, keepdims=True)).mean(0)  # mean over seeds of each class's share
        order = np.argsort(frequency)
        for method in methods[label]:
            accuracy = np.array([r["per_class_acc"] for r in result["runs"] if r["method"] == method.name])
            ax.plot(frequency[order], 100 * np.nanmean(accuracy, 0)[order], marker="o", markersize=3,
                    label=method.name, **method_style(method))  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("share of the class in the training set (log)", fontsize=11)
        ax.set_ylabel("per-class test accuracy (%), mean over seeds", fontsize=11)
        ax.set_title(f"{label}: {len(result['seeds'])} seeds", fontsize=12)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2 if len(methods[label]) > 10 else 1, loc="lower right")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return f"wrote {path}"


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where longtail.json/png go")
    parser.add_argument("--task", action="append", help="digits, segmentation or module:function (repeatable; "
                        "default: digits and segmentation)")  # fmt: skip
    parser.add_argument("--methods", help=f"comma-separated: {METHOD_GRAMMAR} (default: per task)")
    parser.add_argument("--seeds", type=at_least(1), help="paired seeds 0..N-1 (default: digits 10, segmentation "
                        f"8, your task {USER_TASK_SEEDS})")  # fmt: skip
    parser.add_argument("--epochs", type=at_least(1), help="override every task's number of epochs")
    parser.add_argument("--imbalance", type=float, default=100.0, help="digits: n_max / n_min of the training split")
    parser.add_argument("--scenes", type=at_least(1), default=256, help="segmentation: scenes in each split")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    add_threads_argument(parser, "see above")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.imbalance) and args.imbalance >= 1):
        raise UsageError(f"--imbalance must be a number >= 1, got {args.imbalance}")
    out_problem = out_dir_problem(args.out)
    if out_problem is not None:
        raise UsageError(out_problem)
    return args


@command(PROG)
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run(args, argv)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        import scipy.stats  # noqa: F401
    except ImportError:
        raise UsageError("the paired t-test needs scipy: pip install scipy") from None
    device = resolve_device(args.device)
    specs = list(dict.fromkeys(args.task or BUILTIN_TASKS))
    tasks = {spec: resolve_task(spec, args) for spec in specs}
    methods = {
        spec: parse_methods(args.methods, {"digits": DIGITS_METHODS, "segmentation": SEGMENTATION_METHODS}.get(
            spec, USER_TASK_METHODS))
        for spec in specs
    }  # fmt: skip
    # seed 0's task of each: a bad task fails here, before anything is trained or written
    first_tasks = {spec: prepare(spec, make_task(0), methods[spec], args.epochs) for spec, make_task in tasks.items()}

    start = time.perf_counter()
    env = environment(device)
    env["command"] = shlex.join([*PROG.split(), *argv])
    results = {}
    for spec, make_task in tasks.items():

        def task_of_seed(seed: int, spec=spec, make_task=make_task) -> Task:
            return first_tasks[spec] if seed == 0 else prepare(spec, make_task(seed), methods[spec], args.epochs)

        seeds = range(args.seeds or DEFAULT_SEEDS.get(spec, USER_TASK_SEEDS))
        results[spec] = run_task(spec, task_of_seed, seeds, methods[spec], device)
    meta = {**env, "benchmark": "longtail", "wall_s": time.perf_counter() - start}
    data = {"meta": meta, "tasks": results}
    out_json = args.out / "longtail.json"
    write_json(out_json, json_safe(data))

    print(f"\nLong-tail evaluation | {stamp_line(env)}\n$ {env['command']}\n")
    print("\n\n".join(format_task(spec, result) for spec, result in results.items()))
    print(f"\nwall time {data['meta']['wall_s']:.0f} s; wrote {out_json}")
    if not args.no_plot:
        print(plot_per_class(results, methods, args.out / "longtail.png"))
    return 0


def json_safe(value):
    """NaN and infinities (a metric of a class absent from the test set) become null: JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


if __name__ == "__main__":
    raise SystemExit(main())
