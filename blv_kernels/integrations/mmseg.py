"""mmsegmentation adapter: BLV as an mmseg decode-head loss, ``dict(type="BLVLoss", ...)``.

Importing this module registers :class:`MMSegBLVLoss` as ``"BLVLoss"`` in mmseg's loss
registry when mmseg is importable (1.x ``mmseg.registry.MODELS``, 0.x
``mmseg.models.builder.LOSSES``); in a config, ``custom_imports =
dict(imports=["blv_kernels.integrations.mmseg"])`` does that. Nothing here needs mmseg.

The reductions are those of mmseg's ``CrossEntropyLoss`` (``cross_entropy`` and
``weight_reduce_loss`` in ``mmseg/models/losses``), computed by
:func:`blv_kernels.blv_cross_entropy` (the fused kernel on CUDA):

    mean:  loss_weight * sum(l * weight) / (avg_factor + eps),   eps = float32 eps
           avg_factor (when the caller gives none) = number of positions, ignored ones
           included (avg_non_ignore=False, mmseg's default), or of non-ignored positions
           (avg_non_ignore=True); with class_weight, the sum of the class weights of the
           non-ignored positions, plus, when avg_non_ignore=False, class_weight[ignore_index]
           per ignored position (mmseg's ``class_weight[label]``) where ignore_index lies in
           [-C, C), else 1
    sum:   loss_weight * sum(l * weight)
    none:  loss_weight * l * weight, ignored positions 0

(float32 with a ``weight``, as mmseg's ``loss * weight.float()``, else the loss's dtype)

where ``l`` is the per-position loss, multiplied by ``class_weight[target]``. mmseg 1.x
fails (IndexError) when class weights meet an ignored label outside [-C, C), such as 255;
counting such a position as 1 is our choice, so that all-ones class weights equal none.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .._validation import (
    REDUCTIONS,
    check_class_vector,
    check_dense,
    check_logits_target,
    check_options,
    check_position_weight,
    check_reduction,
    real,
)
from ..loss import BLVLoss, blv_cross_entropy_from_weights
from ..weights import class_weight_tensor
from .dataset_counts import load_counts, read_json

__all__ = ["MMSegBLVLoss"]

# mmseg's weight_reduce_loss adds this to avg_factor (no division by zero when all is ignored)
EPS = torch.finfo(torch.float32).eps


class MMSegBLVLoss(BLVLoss):
    """BLV loss with mmseg's loss interface; plain cross-entropy outside training.

    Args:
        class_counts: per-class pixel counts, or the path of a JSON list of them (as written
            by ``blv-kernels count-classes``).
        sigma: the variation's standard deviation (the released configs use 4, the paper 6).
        mode: ``"abs"`` (released code) or ``"clamp"`` (paper's pseudo-code).
        loss_weight: multiplies the loss.
        avg_non_ignore: ``reduction="mean"`` averages over non-ignored positions only
            (mmseg's default ``False`` averages over all positions, ignored ones as 0).
        class_weight: per-class weights, as ``F.cross_entropy``'s ``weight``: a list, array or
            tensor, or a file path as mmseg's ``get_class_weight`` takes (``.npy`` through numpy;
            ``.json`` here, ``.yaml``/``.yml``/``.pkl``/``.pickle`` through mmengine's ``load``).
        loss_name: the key of the loss in mmseg's log dict; it must contain ``loss``, else mmseg
            would log it and leave it out of the total loss (``loss_blv`` does).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (a call's ``reduction_override`` wins).
        smoothing: additive smoothing of ``class_counts`` (needed when a count is 0).
        backend: as in :func:`blv_kernels.blv_cross_entropy`.

    Numbers may be Python or numpy scalars.
    """

    def __init__(
        self,
        class_counts,
        sigma: float = 6.0,
        mode: str = "abs",
        loss_weight: float = 1.0,
        avg_non_ignore: bool = False,
        class_weight=None,
        loss_name: str = "loss_blv",
        reduction: str = "mean",
        smoothing: float = 0.0,
        backend: str = "auto",
    ) -> None:
        if isinstance(class_counts, (str, os.PathLike)):
            class_counts = load_counts(class_counts)
        check_reduction(reduction)
        loss_weight = real("loss_weight", loss_weight)
        if not isinstance(avg_non_ignore, (bool, np.bool_)):
            raise TypeError(f"avg_non_ignore must be True or False, got {avg_non_ignore!r}")
        if not (isinstance(loss_name, str) and "loss" in loss_name):
            raise ValueError(
                f"loss_name must be a str containing 'loss' (mmseg adds only such keys to the total loss), "
                f"got {loss_name!r}"
            )
        if isinstance(class_weight, (str, os.PathLike)):
            class_weight = load_class_weight(class_weight)
        if class_weight is not None:
            class_weight = class_weight_tensor(class_weight, "class_weight")
        # the attribute matches forward()'s default; mmseg passes ignore_index with every call
        super().__init__(
            class_counts, sigma, mode=mode, weight=class_weight, ignore_index=255, reduction=reduction,
            smoothing=real("smoothing", smoothing, minimum=0.0), backend=backend,
        )  # fmt: skip
        self.loss_weight = loss_weight
        self.avg_non_ignore = bool(avg_non_ignore)
        self._loss_name = loss_name

    @property
    def loss_name(self) -> str:
        return self._loss_name

    def forward(
        self,
        cls_score: torch.Tensor,
        label: torch.Tensor,
        weight: torch.Tensor | None = None,
        avg_factor=None,
        reduction_override: str | None = None,
        ignore_index: int = 255,
    ) -> torch.Tensor:
        """mmseg's loss call: logits (N, C, ...), labels (N, ...), optional per-position ``weight``."""
        if reduction_override not in (None, *REDUCTIONS):
            raise ValueError(f"reduction_override must be None or one of {REDUCTIONS}, got {reduction_override!r}")
        reduction = reduction_override or self.reduction
        if reduction == "sum" and avg_factor is not None:
            raise ValueError('avg_factor can not be used with reduction="sum"')  # as mmseg's weight_reduce_loss
        # what is read below before the loss checks its arguments, checked as the loss would
        check_logits_target(cls_score, label)
        self._check_class_count(cls_score)
        check_class_vector("class_weight", self.weight, cls_score)  # (read by the divisor below)
        check_options(ignore_index=ignore_index, label_smoothing=self.label_smoothing)
        if reduction == "mean":
            if avg_factor is None:
                avg_factor = self._default_avg_factor(label, ignore_index)
            elif not isinstance(avg_factor, torch.Tensor) and not torch.compiler.is_compiling():  # (as the loss's)
                avg_factor = real("avg_factor", avg_factor, minimum=0.0)  # mmseg's: >= 0 (0: nothing counted), + eps
            avg_factor = avg_factor + EPS
        else:
            avg_factor = None  # mmseg ignores it with reduction="none"
        if weight is not None:
            if not isinstance(weight, torch.Tensor) or weight.dtype.is_complex:
                got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
                raise TypeError(f"weight (per position) must be a tensor of real numbers, got {got}")
            check_dense("weight", weight)
            try:  # broadcast to the labels' shape, as mmseg's loss * weight does: a view, no copy
                weight = weight.float().expand_as(label)
            except RuntimeError:
                raise ValueError(
                    f"weight (per position) of shape {tuple(weight.shape)} does not broadcast to the labels' shape "
                    f"{tuple(label.shape)}"
                ) from None
            check_position_weight(weight, label, name="weight")  # here, so that its errors name it as the caller does
        options = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=self.label_smoothing,
                       position_weight=weight, avg_factor=avg_factor)  # fmt: skip
        if self.training:
            loss = blv_cross_entropy_from_weights(
                cls_score, label, self.variation_weight, self.weight, variation_params=self.variation_params,
                mode=self.mode, backend=self.backend, **options,
            )  # fmt: skip
        else:
            loss = self._plain_loss(cls_score, label, **options)
        if weight is not None:  # mmseg's loss * weight.float(): float32 for half logits outside autocast too
            loss = loss.to(torch.promote_types(loss.dtype, torch.float32))
        return self.loss_weight * loss

    def _default_avg_factor(self, label: torch.Tensor, ignore_index: int):
        """mmseg's divisor for ``reduction="mean"`` (see the module docstring), computed without a host sync."""
        label = label.long()  # int64: a uint8 label compared with -100 would wrap around
        valid = label != ignore_index
        if self.weight is None:
            return valid.sum() if self.avg_non_ignore else label.numel()
        num_classes = self.weight.numel()
        per_position = self.weight[label.clamp(0, num_classes - 1)]
        if self.avg_non_ignore:
            ignored = 0.0
        else:  # mmseg's class_weight[label] where it has one (a negative index counts from the end), else 1
            ignored = self.weight[ignore_index] if -num_classes <= ignore_index < num_classes else 1.0
        return torch.where(valid, per_position, ignored).sum()

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.variation_weight.numel()}, sigma={self.sigma}, mode={self.mode!r}, "
            f"loss_weight={self.loss_weight}, avg_non_ignore={self.avg_non_ignore}, loss_name={self.loss_name!r}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
        )


def load_class_weight(path: str | os.PathLike):
    """Class weights from a file, as mmseg's ``get_class_weight``: ``.npy`` through numpy, other
    formats through mmengine's ``load`` (json, yaml, pickle; json needs no mmengine here)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class_weight={str(path)!r}: no such file")
    if path.suffix == ".json":
        return read_json(path)  # (its errors name the file)
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        try:
            from mmengine.fileio import load
        except ImportError:
            raise ImportError(f"class_weight={str(path)!r}: reading {path.suffix or 'it'} needs mmengine") from None
        return load(path)
    except (ValueError, TypeError, OSError) as err:  # an object array, an unknown format, unreadable
        raise ValueError(f"class_weight={str(path)!r}: cannot read class weights from it: {err}") from None


def _mmseg_loss_registry():
    """mmseg 1.x's MODELS, else 0.x's LOSSES, else None (mmseg not importable)."""
    try:
        from mmseg.registry import MODELS

        return MODELS
    except ImportError:
        pass
    try:
        from mmseg.models.builder import LOSSES

        return LOSSES
    except ImportError:
        return None


_REGISTRY = _mmseg_loss_registry()
if _REGISTRY is not None:
    _REGISTRY.register_module(name="BLVLoss", module=MMSegBLVLoss)
