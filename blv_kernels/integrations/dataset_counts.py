"""Class pixel counts from label maps: the prior ``class_counts`` of a dataset (supplement section 8).

``count_classes`` counts an iterable of tensors or arrays; ``count_label_files`` counts label
files (PNG through Pillow, ``.npy``) in several processes, reporting unreadable files and
labels outside the class range instead of failing. Counts are saved as a plain JSON list of
integers, so ``BLVLoss(json.load(f))`` and ``BLVLoss(load_counts(path))`` both work.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

__all__ = ["count_classes", "count_label_files", "CountResult", "read_label", "load_counts", "save_counts"]


def read_label(path: str | os.PathLike) -> np.ndarray:
    """A label map as an integer array: ``.npy`` through numpy, anything else through Pillow."""
    path = Path(path)
    if path.suffix == ".npy":
        labels = np.load(path, allow_pickle=False)
    else:
        try:
            from PIL import Image
        except ImportError as err:
            raise ImportError('reading label images needs Pillow: pip install "blv_kernels[data]"') from err
        with Image.open(path) as image:  # palette ("P") images give their indices, as label maps should
            labels = np.asarray(image)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.ndim == 3 and path.suffix != ".npy":
        raise ValueError(f"expected a single-channel label map, got a {labels.shape[2]}-channel image")
    return labels


def _histogram(labels: np.ndarray, num_classes: int, ignore_index: int) -> tuple[np.ndarray, dict[int, int]]:
    """Pixel counts of classes ``0..C-1`` and the counts of values outside ``[0, C)`` that are not ignored."""
    values, freq = np.unique(labels.ravel(), return_counts=True)
    values = values.astype(np.int64)
    counts = np.zeros(num_classes, dtype=np.int64)
    inside = (values >= 0) & (values < num_classes)
    counts[values[inside]] = freq[inside]
    outside = ~inside & (values != ignore_index)
    return counts, {int(v): int(n) for v, n in zip(values[outside], freq[outside], strict=True)}


def _check_num_classes(num_classes: int) -> None:
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


def count_classes(labels: Iterable, num_classes: int, ignore_index: int = 255) -> list[int]:
    """Pixels per class over label maps (tensors or arrays of any shape), ``ignore_index`` excluded.

    Raises ``ValueError`` naming the map and the values when a label is outside
    ``[0, num_classes)`` and is not ``ignore_index``.
    """
    _check_num_classes(num_classes)
    total = np.zeros(num_classes, dtype=np.int64)
    for i, item in enumerate(labels):
        array = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"label map {i} must hold integers, got dtype {array.dtype}")
        counts, outside = _histogram(array, num_classes, ignore_index)
        if outside:
            raise ValueError(
                f"label map {i} has values outside [0, {num_classes}) that are not ignore_index={ignore_index}: "
                f"{outside} (value: pixels)"
            )
        total += counts
    return total.tolist()


@dataclass
class CountResult:
    """What :func:`count_label_files` found: totals, and per file what was left out and why."""

    counts: list[int]
    files_counted: int
    out_of_range: dict[str, dict[int, int]]  # file -> {value: pixels}; these pixels are not counted
    unreadable: dict[str, str]  # file -> error message


def _count_file(path: str, num_classes: int, ignore_index: int):
    try:
        return path, *_histogram(read_label(path), num_classes, ignore_index), None
    except Exception as err:  # any unreadable file is reported with its error, not fatal to the whole count
        return path, None, None, f"{type(err).__name__}: {err}"


def count_label_files(
    paths: Sequence[str | os.PathLike],
    num_classes: int,
    ignore_index: int = 255,
    *,
    workers: int | None = None,
    progress: bool = True,
) -> CountResult:
    """Count label files in ``workers`` processes (default: all CPUs), with a tqdm progress bar.

    Out-of-range values are left out of the counts and listed per file; files that cannot be
    read are listed with their error.
    """
    _check_num_classes(num_classes)
    try:
        from tqdm import tqdm
    except ImportError as err:
        raise ImportError('counting label files needs tqdm: pip install "blv_kernels[data]"') from err
    paths = [str(p) for p in paths]
    workers = min(workers or os.cpu_count() or 1, max(len(paths), 1))
    task = partial(_count_file, num_classes=num_classes, ignore_index=ignore_index)
    outcomes = []
    with (
        tqdm(total=len(paths), unit="file", disable=not progress) as bar,
        Pool(workers) if workers > 1 else nullcontext() as pool,
    ):
        for outcome in pool.imap_unordered(task, paths, chunksize=4) if pool else map(task, paths):
            outcomes.append(outcome)
            bar.update()

    total = np.zeros(num_classes, dtype=np.int64)
    out_of_range, unreadable = {}, {}
    for path, counts, outside, error in sorted(outcomes, key=lambda o: o[0]):
        if error is not None:
            unreadable[path] = error
            continue
        total += counts
        if outside:
            out_of_range[path] = outside
    return CountResult(total.tolist(), len(outcomes) - len(unreadable), out_of_range, unreadable)


def save_counts(counts: Sequence[int], path: str | os.PathLike) -> None:
    """Write counts as a JSON list of integers (what :func:`load_counts` and ``BLVLoss`` take)."""
    Path(path).write_text(json.dumps([int(c) for c in counts]) + "\n")


def load_counts(path: str | os.PathLike) -> list[int]:
    """Read counts written by :func:`save_counts` / ``blv-kernels count-classes``."""
    counts = json.loads(Path(path).read_text())
    if not (isinstance(counts, list) and counts and all(isinstance(c, int) and c >= 0 for c in counts)):
        raise ValueError(f"{path} must hold a non-empty JSON list of non-negative integers (pixel counts per class)")
    return counts
