"""``python -m blv_kernels`` / ``blv-kernels``: the BLV demo (the default command) and dataset tools.

blv-kernels [demo] [--batch 2 --height 64 ...]     BLV loss and gradient on a random batch
blv-kernels count-classes LABEL_DIR --num-classes 19 [--ignore-index 255]
            [--pattern '*_labelTrainIds.png'] [-o counts.json]   pixel counts per class
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import __version__, class_weights
from .backends import BACKEND_NAMES
from .integrations.dataset_counts import count_label_files, save_counts
from .integrations.known_counts import GTA5_CLASS_COUNTS
from .loss import blv_cross_entropy

COMMANDS = ("demo", "count-classes")
MAX_LISTED = 20  # files listed per kind of problem; the rest are only counted


def demo(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    counts = GTA5_CLASS_COUNTS  # a long-tailed prior
    n, c, h, w = args.batch, len(counts), args.height, args.width
    logits = torch.randn(n, c, h, w, device=device, requires_grad=True)
    target = torch.randint(0, c, (n, h, w), device=device, dtype=torch.uint8)
    target[:, : h // 8] = 255  # a band of ignored pixels, as in Cityscapes' void label

    start = time.perf_counter()
    loss = blv_cross_entropy(
        logits, target, class_counts=counts, sigma=args.sigma, ignore_index=255, backend=args.backend
    )
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    plain = F.cross_entropy(logits.detach(), target.long(), ignore_index=255)
    w = class_weights(counts)

    print(f"blv_kernels {__version__} on {device} (torch {torch.__version__})")
    print(f"logits {tuple(logits.shape)} float32, uint8 labels with {(target == 255).float().mean():.1%} ignored")
    print(f"class weights w_c from GTA5 counts: min {w.min():.3f} (road), max {w.max():.3f} (bicycle)")
    print(f"BLV loss (sigma={args.sigma}, backend={args.backend}): {loss.item():.5f}; plain cross-entropy: {plain:.5f}")
    print(
        f"gradient: shape {tuple(logits.grad.shape)}, norm {logits.grad.norm():.5f}; forward+backward {elapsed * 1e3:.1f} ms"
    )
    return 0


def count_classes(args: argparse.Namespace) -> int:
    label_dir = Path(args.label_dir)
    if not label_dir.is_dir():
        print(f"error: {label_dir} is not a directory", file=sys.stderr)
        return 2
    paths = sorted(p for p in label_dir.rglob(args.pattern) if p.is_file())
    if not paths:
        print(f"error: no files matching {args.pattern!r} under {label_dir}", file=sys.stderr)
        return 2
    result = count_label_files(
        paths, args.num_classes, args.ignore_index, workers=args.workers, progress=not args.quiet
    )

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
    print(
        f"counted {result.files_counted} of {len(paths)} files: {sum(result.counts)} pixels in {args.num_classes} "
        f"classes ({len(result.unreadable)} unreadable, {len(result.out_of_range)} with out-of-range labels)",
        file=sys.stderr,
    )
    unseen = [c for c, n in enumerate(result.counts) if n == 0]
    if unseen:
        print(f"warning: class(es) {unseen} have no pixels: BLVLoss needs smoothing > 0 for them", file=sys.stderr)
    if args.output:
        save_counts(result.counts, args.output)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(json.dumps(result.counts))
    return 0 if result.files_counted else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blv-kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"blv_kernels {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("demo", help="BLV loss and gradient on a random batch (the default command)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--sigma", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--backend", default="auto", choices=BACKEND_NAMES)
    p.set_defaults(run=demo)

    p = commands.add_parser(
        "count-classes",
        help="pixels per class in a directory of label maps, as JSON for BLVLoss",
        description="Count the pixels of each class in label maps (PNG, .npy) under LABEL_DIR, "
        "excluding --ignore-index, and write them as a JSON list that BLVLoss accepts.",
    )
    p.add_argument("label_dir", metavar="LABEL_DIR", help="searched recursively")
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--ignore-index", type=int, default=255)
    p.add_argument("--pattern", default="*.png", help="file name pattern (default: '*.png')")
    p.add_argument("-o", "--output", help="JSON file to write (default: print to stdout)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=count_classes)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["demo", *argv]  # `python -m blv_kernels [demo options]` runs the demo (README quickstart)
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
