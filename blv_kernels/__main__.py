"""The blv-kernels command (also run as: python -m blv_kernels): the BLV demo and a dataset tool.

blv-kernels [demo] [--batch 2 --height 64 ...]   BLV loss and gradient on a random batch (the default)
blv-kernels count-classes LABEL_DIR --num-classes 19 [--ignore-index 255]
            [--pattern '*_labelTrainIds.png'] [-o counts.json]   pixel counts per class, as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import __version__, class_weights, noise
from ._validation import INT64_MAX, INT64_MIN
from .backends import BACKEND_NAMES, get_backend
from .integrations.dataset_counts import MAX_CLASSES, count_label_files, counts_target, find_label_files, save_counts
from .integrations.known_counts import GTA5_CLASS_COUNTS
from .loss import blv_cross_entropy

MAX_LISTED = 20  # files listed per kind of problem; the rest are only counted
# The demo's logits, gradient and the reference's temporaries: a few GiB at most
MAX_DEMO_ELEMENTS = 2**28
IGNORE_INDEX = 255  # the demo's void label, as Cityscapes'

COUNT_EPILOG = """\
The ignore label is never counted, also when it lies inside [0, NUM_CLASSES).

Cityscapes: gtFine/ holds four maps per image (*_labelTrainIds.png, *_labelIds.png, *_color.png,
*_instanceIds.png), each in its own encoding. Count the train ids, the 19 classes BLVLoss takes:

  blv-kernels count-classes data/cityscapes/gtFine/train --num-classes 19 --ignore-index 255 \\
      --pattern '*_labelTrainIds.png' -o counts.json

A pattern that matches maps of several of those kinds (the default '*.png' on gtFine/) is refused.
"""


class CliError(Exception):
    """A problem with the command's input: printed as one line, exit status ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (the usage is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _integer(minimum: int, maximum: int | None = None):
    """An argparse type: an integer in [minimum, maximum]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f">= {minimum}" + ("" if maximum is None else f" and <= {maximum}")
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {value}")
        return value

    return parse


def _sigma(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    try:
        noise.check_sigma(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, {noise.SIGMA_MAX:g}], got {text}") from None
    return value


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"the demo runs on cpu or cuda, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA device is available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: there are {torch.cuda.device_count()} CUDA device(s)")
    return device


def demo(args: argparse.Namespace) -> int:
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    counts = GTA5_CLASS_COUNTS  # a long-tailed prior
    n, c, h, w = args.batch, len(counts), args.height, args.width
    if n * c * h * w > MAX_DEMO_ELEMENTS:
        raise CliError(
            f"the logits would have {n * c * h * w:,} elements; the demo takes at most {MAX_DEMO_ELEMENTS:,}"
        )
    if args.backend != "auto":
        problem = get_backend(args.backend).why_not(device.type, torch.float32)
        if problem is not None:
            raise CliError(f"--backend {args.backend} on {device}: {problem}")
    torch.manual_seed(args.seed)
    logits = torch.randn(n, c, h, w, device=device, requires_grad=True)
    target = torch.randint(0, c, (n, h, w), device=device, dtype=torch.uint8)
    target[:, : h // 8] = IGNORE_INDEX  # a band of ignored pixels, as in Cityscapes' void label

    def timed_step() -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        logits.grad = None
        loss = blv_cross_entropy(
            logits, target, class_counts=counts, sigma=args.sigma, ignore_index=IGNORE_INDEX, backend=args.backend
        )
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss, time.perf_counter() - start

    first = timed_step()[1]  # the first call compiles the kernels (once; cached on disk)
    loss, elapsed = timed_step()
    plain = F.cross_entropy(logits.detach(), target.long(), ignore_index=IGNORE_INDEX)
    weights = class_weights(counts)

    print(f"blv_kernels {__version__} on {device} (torch {torch.__version__})")
    ignored = (target == IGNORE_INDEX).float().mean()
    print(f"logits {tuple(logits.shape)} float32, uint8 labels with {ignored:.1%} ignored")
    print(f"class weights w_c from GTA5 counts: min {weights.min():.3f} (road), max {weights.max():.3f} (bicycle)")
    print(f"BLV loss (sigma={args.sigma}, backend={args.backend}): {loss.item():.5f}; plain cross-entropy: {plain:.5f}")
    print(
        f"gradient: shape {tuple(logits.grad.shape)}, norm {logits.grad.norm():.5f}; forward+backward {elapsed * 1e3:.1f} ms "
        f"(the first call: {first * 1e3:.1f} ms)"
    )
    return 0


def _label_dir(text: str) -> str:
    """An argparse type: a directory's path, not empty (pathlib would take "" for the current directory)."""
    if not text:
        raise argparse.ArgumentTypeError("the directory to search is an empty path (the current one is '.')")
    return text


def _check_output(text: str) -> Path:
    """``-o``'s file, checked before counting, not after: fail now when the counts could not be written."""
    # "dir/", "dir/." name a directory; Path() would drop their end and write a file named "dir"
    if text and os.path.basename(text) in ("", ".", ".."):
        raise CliError(
            f"-o {text} names a directory, not a file: name the file to write, e.g. {os.path.join(text, 'counts.json')}"
        )
    try:
        path = counts_target(Path(text))
    except ValueError as err:
        raise CliError(f"-o {err}") from None
    parent = path.parent
    if not parent.is_dir():
        raise CliError(f"-o {path}: directory {parent} does not exist")
    try:  # a file created and removed, as save_counts will create one there (os.access passes anything for root)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".blv-kernels-", suffix=".tmp"):
            pass
    except OSError as err:
        raise CliError(f"-o {path}: cannot create a file in directory {parent}: {err.strerror or err}") from None
    return Path(text)


def _print_counts(counts: list[int]) -> None:
    """The counts on stdout, flushed now: a write that fails (a full disk, a closed stdout) is an error, not
    counts lost without a word."""
    if sys.stdout is None:  # the command was started with stdout closed
        raise CliError("stdout is closed: nothing to print the counts to (write them with -o FILE)", exit_code=1)
    try:
        print(json.dumps(counts), flush=True)
    except OSError as err:
        raise CliError(f"cannot write the counts to stdout: {err.strerror or err}", exit_code=1) from None


def count_classes(args: argparse.Namespace) -> int:
    try:
        paths = find_label_files(args.label_dir, args.pattern)
    except ValueError as err:
        raise CliError(str(err)) from None
    output = None if args.output is None else _check_output(args.output)
    try:
        result = count_label_files(
            paths, args.num_classes, args.ignore_index, workers=args.workers, progress=not args.quiet
        )
    except ImportError as err:  # Pillow or tqdm: checked before the first file is read
        raise CliError(str(err)) from None

    def report(problems: dict, what: str, describe) -> None:
        for path, problem in list(problems.items())[:MAX_LISTED]:
            print(f"{path}: {what}: {describe(problem)}", file=sys.stderr)
        if len(problems) > MAX_LISTED:
            print(f"... and {len(problems) - MAX_LISTED} more file(s) with {what}", file=sys.stderr)

    report(result.unreadable, "unreadable, skipped", str)
    report(
        result.out_of_range,
        f"labels outside [0, {args.num_classes}) and not {args.ignore_index}, not counted",
        lambda found: ", ".join(f"value {value}: {pixels} px" for value, pixels in found.items()),
    )
    if not result.files_counted:
        raise CliError(f"none of the {len(paths)} files could be read: nothing written", exit_code=1)
    print(
        f"counted {result.files_counted} of {len(paths)} files: {sum(result.counts)} pixels in {args.num_classes} "
        f"classes ({len(result.unreadable)} unreadable, {len(result.out_of_range)} with out-of-range labels)",
        file=sys.stderr,
    )
    if 0 <= args.ignore_index < args.num_classes:
        print(f"note: class {args.ignore_index} is --ignore-index: its pixels are not counted", file=sys.stderr)
    unseen = [c for c, n in enumerate(result.counts) if n == 0]
    if unseen:
        print(f"warning: class(es) {unseen} have no pixels: BLVLoss needs smoothing > 0 for them", file=sys.stderr)
    if output is None:
        _print_counts(result.counts)
        return 0
    try:
        save_counts(result.counts, output)
    except OSError as err:
        raise CliError(f"cannot write {output}: {err.strerror or err}", exit_code=1) from None
    print(f"wrote {output}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="blv-kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"blv_kernels {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="demo or count-classes")

    p = commands.add_parser(
        "demo",
        help="BLV loss and gradient on a random batch (the default command)",
        description="Compute the BLV loss and its gradient on random logits of the 19 Cityscapes classes "
        "(GTA5 class counts as the prior), a band of ignored pixels included, and print them.",
    )
    p.add_argument("--batch", type=_integer(1), default=2, help="images in the batch (default: 2)")
    p.add_argument("--height", type=_integer(1), default=64, help="image height in pixels (default: 64)")
    p.add_argument("--width", type=_integer(1), default=128, help="image width in pixels (default: 128)")
    p.add_argument("--sigma", type=_sigma, default=6.0, help="the variation's standard deviation, >= 0 (default: 6)")
    p.add_argument("--seed", type=_integer(0, 2**64 - 1), default=0, help="torch.manual_seed (default: 0)")
    p.add_argument("--device", type=_device, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--backend", default="auto", choices=BACKEND_NAMES, help="the implementation to run (default: auto)")
    p.set_defaults(run=demo)

    p = commands.add_parser(
        "count-classes",
        help="pixels per class in a directory of label maps, as JSON for BLVLoss",
        description="Count the pixels of each class in the label maps (PNG, .npy) under LABEL_DIR and write "
        "them as a JSON list that BLVLoss takes.",
        epilog=COUNT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("label_dir", type=_label_dir, metavar="LABEL_DIR", help="the directory searched, recursively")
    p.add_argument("--num-classes", type=_integer(1, MAX_CLASSES), required=True, help="C: labels 0..C-1 are counted")
    p.add_argument(
        "--ignore-index", type=_integer(INT64_MIN, INT64_MAX), default=255,
        help="the label that is not counted (default: 255)",
    )  # fmt: skip
    p.add_argument(
        "--pattern", default="*.png",
        help="file name pattern (default: '*.png'; Cityscapes: '*_labelTrainIds.png', see below)",
    )  # fmt: skip
    p.add_argument("-o", "--output", help="JSON file to write (default: print to stdout)")
    p.add_argument("--workers", type=_integer(1), default=None, help="processes (default: all CPUs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (tqdm is then not needed)")
    p.set_defaults(run=count_classes)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["demo", *argv]  # `python -m blv_kernels [demo options]` runs the demo (README quickstart)
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CliError as err:
        print(f"blv-kernels {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
