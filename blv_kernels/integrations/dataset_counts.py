"""Class pixel counts from label maps: the prior ``class_counts`` of a dataset (supplement section 8).

``count_classes`` counts an iterable of tensors or arrays; ``find_label_files`` finds label
files under a directory, refusing a pattern that mixes Cityscapes' label kinds;
``count_label_files`` counts label files (PNG through Pillow, ``.npy``) in several processes,
reporting unreadable files and labels outside the class range instead of failing. The ignore
label is never counted, wherever it lies. Counts are saved as a plain JSON list of integers,
so ``BLVLoss(json.load(f))`` and ``BLVLoss(load_counts(path))`` both work.
"""

from __future__ import annotations

import json
import numbers
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from .._validation import check_dense, check_holds_values, integer, integer_ignore_index

__all__ = [
    "count_classes",
    "count_label_files",
    "find_label_files",
    "CountResult",
    "read_label",
    "load_counts",
    "save_counts",
    "MAX_CLASSES",
]

# The counts are a list of C numbers (a JSON file, a BLVLoss buffer): far more classes than any
# label set has, and few enough that a mistyped --num-classes cannot exhaust the memory.
MAX_CLASSES = 2**20
# Cityscapes ships several maps per image, each with its own encoding (gtFine and gtCoarse alike):
# a pattern that matches two of these kinds adds up pixels of different label spaces.
CITYSCAPES_LABEL_KINDS = ("_labelTrainIds", "_labelIds", "_instanceTrainIds", "_instanceIds", "_color")


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
        with Image.open(path) as image:
            # palette ("P") images give their indices, as label maps should; 1-bit masks ("1") their 0/1 values
            labels = np.asarray(image, dtype=np.uint8 if image.mode == "1" else None)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.ndim == 3 and path.suffix != ".npy":
        raise ValueError(f"expected a single-channel label map, got a {labels.shape[2]}-channel image")
    return labels


def _histogram(labels: np.ndarray, num_classes: int, ignore_index: int):
    """The classes in ``[0, C)`` present (ignore_index excluded) with their pixels, and ``{value: pixels}``
    of the values outside ``[0, C)`` that are not ignored. Sparse: nothing here is of size C."""
    values, pixels = np.unique(labels.ravel(), return_counts=True)
    # values keep their dtype: numpy compares uint64 with negative or large Python ints by value
    ignored = values == ignore_index
    inside = (values >= 0) & (values < num_classes) & ~ignored
    outside = ~inside & ~ignored
    found = dict(zip(values[outside].tolist(), pixels[outside].tolist(), strict=True))
    return values[inside].astype(np.int64), pixels[inside].astype(np.int64), found


def _check_num_classes(num_classes) -> int:
    return integer("num_classes", num_classes, minimum=1, maximum=MAX_CLASSES)


def count_classes(labels: Iterable, num_classes: int, ignore_index: int = 255) -> list[int]:
    """Pixels per class over label maps (tensors or arrays of any shape), ``ignore_index`` excluded
    (also when it lies inside ``[0, num_classes)``: that class then counts 0).

    Raises ``ValueError`` naming the map and the values when a label is outside
    ``[0, num_classes)`` and is not ``ignore_index``.
    """
    num_classes = _check_num_classes(num_classes)
    ignore_index = integer_ignore_index(ignore_index)
    try:
        items = iter(labels)
    except TypeError:  # a number, a 0-d tensor or array
        raise TypeError(
            f"labels must be an iterable of label maps (tensors or arrays), got {type(labels).__name__}"
        ) from None
    total = np.zeros(num_classes, dtype=np.int64)
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            check_dense(f"label map {i}", item)
            if item.dtype.is_floating_point or item.dtype.is_complex:  # (before numpy, which has no bfloat16)
                raise ValueError(f"label map {i} must hold integers, got dtype {item.dtype}")
            check_holds_values(f"label map {i}", item, "labels")
            array = item.detach().cpu().numpy()
        else:
            try:
                array = np.asarray(item)
            except ValueError:  # a ragged nested list
                raise ValueError(f"label map {i} must be an array of integers, got a ragged sequence") from None
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"label map {i} must hold integers, got dtype {array.dtype}")
        classes, pixels, outside = _histogram(array, num_classes, ignore_index)
        if outside:
            raise ValueError(
                f"label map {i} has values outside [0, {num_classes}) that are not ignore_index={ignore_index}: "
                f"{outside} (value: pixels)"
            )
        total[classes] += pixels
    return total.tolist()


def find_label_files(root: str | os.PathLike, pattern: str = "*.png") -> list[Path]:
    """The files under ``root`` (searched recursively) whose names match ``pattern``, sorted.

    Raises ``ValueError`` when ``root`` is not a directory, nothing matches, the matches are
    Cityscapes label maps of several kinds (``*_labelTrainIds.png`` beside ``*_labelIds.png``,
    ``*_color.png``, ``*_instanceIds.png``...): counted together they would mix label encodings,
    or a file is found twice through a symbolic link (it would count twice).
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    try:
        paths = sorted(p for p in root.rglob(pattern) if p.is_file())
    except (ValueError, NotImplementedError) as err:  # an empty or absolute pattern
        raise ValueError(f"invalid pattern {pattern!r}: {err}") from None
    if not paths:
        raise ValueError(f"no files matching {pattern!r} under {root}")
    repeated = _repeated_files(paths)
    if repeated:  # which of its paths counts would be an arbitrary choice: the caller narrows root or pattern
        raise ValueError(
            f"{len(repeated)} file(s) under {root} are found through more than one path (a symbolic link), "
            f"e.g. {repeated[0]}: each file counts once; narrow the directory or the pattern"
        )
    kinds = Counter((kind, p.suffix) for p in paths for kind in CITYSCAPES_LABEL_KINDS if p.stem.endswith(kind))
    if len(kinds) > 1:
        found = ", ".join(f"{n} *{kind}{suffix}" for (kind, suffix), n in kinds.most_common())
        raise ValueError(
            f"pattern {pattern!r} matches Cityscapes label maps of {len(kinds)} kinds under {root} ({found}): "
            "counted together they mix label encodings; narrow it to one kind, e.g. '*_labelTrainIds.png' "
            "(the 19 training classes)"
        )
    return paths


def _repeated_files(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The files that ``paths`` names more than once (also through links or ``.``), by their real paths."""
    return [p for p, n in Counter(os.path.realpath(p) for p in paths).items() if n > 1]


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
        return path, None, None, None, f"{type(err).__name__}: {err}"


def _check_readers(paths: Sequence[str | os.PathLike], *, progress: bool) -> None:
    """Raise ``ImportError`` now, not once per file, when Pillow (for the images among ``paths``) or
    tqdm (for ``progress``) is missing."""
    if any(Path(p).suffix != ".npy" for p in paths):
        try:
            import PIL.Image  # noqa: F401
        except ImportError:
            raise ImportError('reading label images needs Pillow: pip install "blv_kernels[data]"') from None
    if progress:
        try:
            import tqdm  # noqa: F401
        except ImportError:
            raise ImportError(
                'the progress bar needs tqdm: pip install "blv_kernels[data]", or turn it off (progress=False, '
                "the command's --quiet)"
            ) from None


@contextmanager
def _progress(total: int, enabled: bool):
    """A function to call once per file: a tqdm bar's update, or nothing."""
    if not enabled:
        yield lambda: None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="file") as bar:
        yield bar.update


def count_label_files(
    paths: Sequence[str | os.PathLike],
    num_classes: int,
    ignore_index: int = 255,
    *,
    workers: int | None = None,
    progress: bool = True,
) -> CountResult:
    """Count label files in ``workers`` processes (default: all CPUs), with a tqdm progress bar.

    ``paths``: the files, each once (e.g. :func:`find_label_files`); a single path, or a file
    listed twice (it would count twice), raises. ``ignore_index`` is never counted. Out-of-range
    values are left out of the counts and listed per file; files that cannot be read are listed
    with their error.
    """
    num_classes = _check_num_classes(num_classes)
    ignore_index = integer_ignore_index(ignore_index)
    if workers is not None:
        workers = integer("workers", workers, minimum=1)
    if isinstance(paths, (str, bytes, os.PathLike)):  # iterated, it would give one-character paths
        raise TypeError(f"paths must be a sequence of label files, got the single path {paths!r}: pass [path]")
    paths = [str(p) for p in paths]
    repeated = _repeated_files(paths)
    if repeated:
        raise ValueError(
            f"paths lists {len(repeated)} file(s) more than once, e.g. {repeated[0]}: each file counts once"
        )
    _check_readers(paths, progress=progress)
    workers = min(workers or os.cpu_count() or 1, max(len(paths), 1))
    task = partial(_count_file, num_classes=num_classes, ignore_index=ignore_index)
    outcomes = []
    with _progress(len(paths), progress) as advance, Pool(workers) if workers > 1 else nullcontext() as pool:
        for outcome in pool.imap_unordered(task, paths, chunksize=4) if pool else map(task, paths):
            outcomes.append(outcome)
            advance()

    total = np.zeros(num_classes, dtype=np.int64)
    out_of_range, unreadable = {}, {}
    for path, classes, pixels, outside, error in sorted(outcomes, key=lambda o: o[0]):
        if error is not None:
            unreadable[path] = error
            continue
        total[classes] += pixels
        if outside:
            out_of_range[path] = outside
    return CountResult(total.tolist(), len(outcomes) - len(unreadable), out_of_range, unreadable)


def _whole_float(value) -> bool:
    return isinstance(value, (float, np.floating)) and float(value).is_integer()


def _counts_problem(counts) -> str | None:
    """Why ``counts`` cannot be the counts file's list, or None: the one rule of :func:`save_counts`
    and :func:`load_counts`, a non-empty list of non-negative integers (Python or numpy; not bools)."""
    if not isinstance(counts, (list, tuple)):
        return f"got a {type(counts).__name__}"
    if not counts:
        return "got an empty list"
    for i, count in enumerate(counts):
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            return f"item {i} is {count!r}"
    return None


def save_counts(counts: Sequence[int], path: str | os.PathLike) -> None:
    """Write counts as a JSON list of integers (what :func:`load_counts` and ``BLVLoss`` take).

    ``counts``: a list, tuple, numpy array or tensor of non-negative integers, or of whole-valued
    floats (``ClassCounter.counts()`` without ``ema_decay``: float64), written as integers;
    anything else :func:`load_counts` would refuse (fractions, negative numbers, no counts) raises
    ``ValueError``.
    Written to a temporary file beside ``path`` first, then renamed: never half a file. A symlink
    is written through (the link stays); a special file (a device, a pipe) is refused, as the
    rename would replace it.
    """
    path = Path(path)
    target = counts_target(path)
    if isinstance(counts, torch.Tensor):
        check_dense("counts", counts)
        check_holds_values("counts", counts, "counts")
    values = counts.tolist() if isinstance(counts, (np.ndarray, torch.Tensor)) else counts
    if isinstance(values, (list, tuple)):  # one-element tensors and whole floats (numpy's too) as ints
        values = [v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v for v in values]
        values = [int(v) if _whole_float(v) else v for v in values]
    problem = _counts_problem(values)
    if problem is not None:
        raise ValueError(
            f"counts must be a non-empty list of non-negative integers (pixel counts per class): {problem}"
        )
    text = json.dumps([int(c) for c in values]) + "\n"
    partial_file = target.with_name(f".{target.name[:100]}.{os.getpid()}.tmp")  # (a name's 255 bytes)
    try:
        partial_file.write_text(text)
        partial_file.replace(target)
    except OSError as error:  # named after the file asked for, not the temporary one
        raise type(error)(error.errno, error.strerror, str(path)) from None
    finally:
        partial_file.unlink(missing_ok=True)  # only left when writing or renaming failed


def counts_target(path: Path) -> Path:
    """The file :func:`save_counts` replaces for ``path``: a symlink's target; a ``ValueError`` for
    anything that exists and is no regular file (``/dev/null`` was replaced by a file)."""
    target = Path(os.path.realpath(path))
    if target.is_dir():
        raise ValueError(f"{path} is a directory: name the file to write, e.g. {path / 'counts.json'}")
    if target.exists() and not target.is_file():
        raise ValueError(f"{path} is not a regular file: counts are written by renaming a new file over it")
    return target


def load_counts(path: str | os.PathLike) -> list[int]:
    """Read counts written by :func:`save_counts` / ``blv-kernels count-classes``."""
    counts = read_json(path)
    problem = _counts_problem(counts)
    if problem is not None:
        raise ValueError(
            f"{path} must hold a non-empty JSON list of non-negative integers (pixel counts per class): {problem}"
        )
    return counts


def read_json(path: str | os.PathLike):
    """The JSON value in the file at ``path``; malformed JSON raises a ``ValueError`` that names the file."""
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError; nested too deep
        raise ValueError(f"{path} is not valid JSON: {error}") from None
