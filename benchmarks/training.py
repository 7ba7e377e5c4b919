"""Training-overhead benchmark: what BLV costs per training iteration of a segmentation network.

    python -m benchmarks.training [--quick] [--out DIR]

Full iterations (forward, loss, backward, SGD step) of torchvision's DeepLabV3-ResNet50 (or
FCN-ResNet50) at a Cityscapes crop, or of a self-contained encoder-decoder where torchvision is
not installed, with plain cross-entropy, the BLV reference and the fused BLV backends, in fp32
and bf16 autocast. The losses take turns within each round, so drift of the clocks hits them
alike; the rounds' spread is the run-to-run noise an overhead must be read against. Each
precision's row is printed and ``training.json`` rewritten as soon as it is measured; the whole
table, laid out like the supplement's Table 4, comes last.

On a CPU the default is a short profile (small input, 3 rounds of 2 iterations), and bf16
autocast is skipped where the CPU has no native bf16 (``--precisions amp_bf16`` times it anyway).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from blv_kernels import BLVLoss

from .common import (
    IGNORE_INDEX,
    SIGMA,
    ArgumentParser,
    UsageError,
    at_least,
    blv_backend_problem,
    budget_seconds,
    class_counts,
    command,
    cpu_bf16_problem,
    environment,
    log,
    names_in,
    out_dir_problem,
    quantiles,
    resolve_device,
    stamp_line,
    synchronize,
    write_json,
)

PROG = "python -m benchmarks.training"
NUM_CLASSES = 19  # Cityscapes
# (batch, height, width): mmseg's Cityscapes setting is two 512x1024 crops per GPU.
SIZES = {"full": (2, 512, 1024), "small": (2, 64, 128), "tiny": (1, 32, 64)}
LOSSES = {  # name -> (label, blv_kernels backend or None for plain cross-entropy)
    "cross_entropy": ("w/o BLV", None),
    "blv_reference": ("BLV reference", "reference"),
    "blv_triton": ("BLV Triton", "triton"),
    "blv_cuda": ("BLV CUDA C++", "cuda"),
    "blv_cpu": ("BLV CPU C++", "cpu"),
}
PRECISIONS = {"fp32": None, "amp_bf16": torch.bfloat16}  # autocast dtype
TABLE4_HEADER = ("precision", *(label for label, _ in LOSSES.values()), "spread")  # the table's columns
# (rounds, iterations per round, warm-up iterations per loss) by default: a GPU run, the GPU
# check's --quick, and the CPU's short profile (an iteration there takes about a second)
PROFILES = {"gpu": (10, 5, 3), "quick": (6, 3, 3), "cpu": (3, 2, 1)}
TORCHVISION_MODELS = ("deeplabv3_resnet50", "fcn_resnet50")
MODELS = ("auto", *TORCHVISION_MODELS, "encdec")
RESULT_FIELDS = (
    "precision", "loss", "status", "reason", "ms_per_iter", "ms_p20", "ms_p80", "overhead_pct", "rounds",
    "iters_per_round",
)  # fmt: skip


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dilation: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn_relu(cin, cout, stride, dilation),
            nn.Conv2d(cout, cout, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class EncoderDecoder(nn.Module):
    """A ResNet-18-like dilated encoder (output stride 8, as DeepLabV3's) and a small decoder.

    The stand-in where torchvision is missing: cheaper than DeepLabV3-ResNet50, so its overheads
    read larger; compare losses within one run, not across models.
    """

    def __init__(self, num_classes: int, width: int = 64) -> None:
        super().__init__()
        widths = (width, 2 * width, 4 * width, 8 * width)
        layers = [_conv_bn_relu(3, width, stride=2), _conv_bn_relu(width, width, stride=2)]
        cin = width
        for cout, stride, dilation in zip(widths, (1, 2, 1, 1), (1, 1, 2, 4), strict=True):
            layers += [_ResidualBlock(cin, cout, stride, dilation), _ResidualBlock(cout, cout, 1, dilation)]
            cin = cout
        self.encoder = nn.Sequential(*layers)
        self.decoder = nn.Sequential(_conv_bn_relu(cin, 4 * width), nn.Conv2d(4 * width, num_classes, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.decoder(self.encoder(images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_model(name: str) -> str:
    if name != "auto":
        return name
    return "deeplabv3_resnet50" if has_torchvision() else "encdec"


def build_model(name: str) -> nn.Module:
    if name == "encdec":
        return EncoderDecoder(NUM_CLASSES)
    from torchvision.models import segmentation

    # weights=None everywhere: nothing is downloaded, and random weights cost the same.
    return getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=False)


def make_criterion(loss: str, device: torch.device):
    backend = LOSSES[loss][1]
    if backend is None:
        return lambda logits, target: F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    return BLVLoss(class_counts(NUM_CLASSES), SIGMA, ignore_index=IGNORE_INDEX, backend=backend).to(device)


def train_step(model, criterion, optimizer, images, labels, amp_dtype) -> None:
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        out = model(images)
        logits = out["out"] if isinstance(out, dict) else out  # torchvision returns a dict
        loss = criterion(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def time_precision(model, optimizer, criteria, images, labels, amp_dtype, args, device, deadline) -> dict:
    """Per-round ms/iteration of each loss, the losses taking turns within a round."""
    for criterion in criteria.values():
        for _ in range(args.warmup):  # cuDNN autotuning, Triton compilation, allocator growth
            train_step(model, criterion, optimizer, images, labels, amp_dtype)
    per_round = {loss: [] for loss in criteria}
    for round_ in range(args.rounds):
        if round_ >= 2 and time.perf_counter() > deadline:
            break  # two rounds still give a spread
        for loss, criterion in criteria.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.iters):
                train_step(model, criterion, optimizer, images, labels, amp_dtype)
            synchronize(device)
            per_round[loss].append((time.perf_counter() - start) * 1e3 / args.iters)
    return per_round


def table4(data: dict) -> str:
    """The results laid out like the supplement's Table 4: one row per precision, losses side by side."""
    meta = data["meta"]
    batch, height, width = meta["input"]
    lines = [
        f"Training time per iteration, {meta['model']}, batch {batch}x3x{height}x{width}, {NUM_CLASSES} classes "
        f"| {stamp_line(meta)}",
        meta["note"],
        "ms/iteration: median over rounds [20%, 80%]; (+x%): overhead vs w/o BLV; spread: w/o BLV's (80%-20%)/median",
    ]
    table = [list(TABLE4_HEADER)]
    for precision in PRECISIONS:
        rows = {r["loss"]: r for r in data["results"] if r["precision"] == precision}
        if rows:
            table.append(table4_cells(precision, rows))
    widths = [max(len(row[i]) for row in table) + 3 for i in range(len(table[0]))]
    lines += ["".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in table]
    lines += skip_reasons(data["results"])
    return "\n".join(lines)


def skip_reasons(results: list[dict]) -> list[str]:
    """Why rows were not timed, each reason once: per precision when no loss ran in it, else per loss."""
    lines, by_loss = [], {}
    precisions = list(dict.fromkeys(r["precision"] for r in results))
    for precision in precisions:
        rows = [r for r in results if r["precision"] == precision]
        reasons = {r["reason"] for r in rows}
        if all(r["status"] != "ok" for r in rows) and len(reasons) == 1:
            lines.append(f"  {precision}: {reasons.pop()}")
            continue
        for r in rows:
            if r["status"] != "ok":
                by_loss.setdefault((r["loss"], r["reason"]), []).append(precision)
    for (loss, reason), where in by_loss.items():
        scope = "" if where == precisions else f" ({', '.join(where)})"
        lines.append(f"  {LOSSES[loss][0]}{scope}: {reason}")
    return lines


def table4_cells(precision: str, rows: dict[str, dict]) -> list[str]:
    """One precision's row of Table 4: ms/iteration and overhead per loss, then the baseline's spread."""
    cells = []
    for loss in LOSSES:
        r = rows.get(loss)
        if r is None:  # a training.json written before this loss was benchmarked
            cells.append("-")
            continue
        if r["status"] != "ok":
            cells.append(r["status"])
            continue
        cell = f"{r['ms_per_iter']:.1f} [{r['ms_p20']:.1f}, {r['ms_p80']:.1f}]"
        if r["overhead_pct"] is not None and loss != "cross_entropy":
            cell += f" ({r['overhead_pct']:+.1f}%)"
        cells.append(cell)
    base = rows["cross_entropy"]
    spread = f"{100 * (base['ms_p80'] - base['ms_p20']) / base['ms_per_iter']:.1f}%" if base["ms_per_iter"] else "-"
    return [precision, *cells, spread]


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where training.json goes")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    parser.add_argument("--size", choices=tuple(SIZES), help="input size; default: full on a GPU, small on the CPU")
    parser.add_argument(
        "--model", choices=MODELS, default="auto", help="auto: DeepLabV3-ResNet50 if torchvision is installed"
    )
    profile = parser.add_mutually_exclusive_group()
    profile.add_argument("--quick", action="store_true", help="fewer rounds (the GPU check's setting)")
    profile.add_argument(
        "--full", action="store_true", help="on a CPU too: the GPU's rounds and iterations, not the short profile"
    )
    parser.add_argument("--rounds", type=at_least(1), help="timed rounds per loss (default 10, --quick 6, CPU 3)")
    parser.add_argument("--iters", type=at_least(1), help="iterations per round (default 5, --quick 3, CPU 2)")
    parser.add_argument("--warmup", type=at_least(0), help="untimed iterations per loss first (default 3, CPU 1)")
    parser.add_argument(
        "--precisions",
        help=f"comma-separated subset of {','.join(PRECISIONS)} (default: all; on a CPU without native bf16: fp32)",
    )
    parser.add_argument(
        "--budget-s", type=budget_seconds, default=math.inf, help="cut rounds, then precisions, after this"
    )
    args = parser.parse_args(argv)
    if args.precisions is not None:
        args.precisions = names_in("precisions", args.precisions, PRECISIONS)
    if args.model in TORCHVISION_MODELS and not has_torchvision():
        raise UsageError(f"--model {args.model} needs torchvision: pip install torchvision (or --model encdec)")
    out_problem = out_dir_problem(args.out)
    if out_problem is not None:
        raise UsageError(out_problem)
    return args


def choose_profile(args, device: torch.device) -> tuple[str, tuple[int, int, int]]:
    """The profile's name and its (rounds, iterations per round, warm-up), each overridable by its option."""
    name = "quick" if args.quick else "cpu" if device.type == "cpu" and not args.full else "gpu"
    defaults = PROFILES[name]
    chosen = tuple(
        given or default for given, default in zip((args.rounds, args.iters, args.warmup), defaults, strict=True)
    )
    return name, chosen


def precision_problems(args, device: torch.device) -> dict[str, str | None]:
    """Why each precision is not timed in this run, or None."""
    problems = {}
    for precision, amp_dtype in PRECISIONS.items():
        if args.precisions is not None:
            problems[precision] = None if precision in args.precisions else "not selected (--precisions)"
        elif amp_dtype == torch.bfloat16 and device.type == "cpu":
            bf16 = cpu_bf16_problem()
            problems[precision] = None if bf16 is None else f"bf16 autocast skipped: {bf16}"
        else:
            problems[precision] = None
    return problems


@command(PROG)
def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    size = args.size or ("full" if device.type == "cuda" else "small")
    profile_name, (args.rounds, args.iters, args.warmup) = choose_profile(args, device)
    model_name = resolve_model(args.model)
    start = time.perf_counter()
    deadline = start + args.budget_s
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True  # as mmseg's configs do; the warm-up iterations absorb the tuning
    batch, height, width = SIZES[size]
    images = torch.randn(batch, 3, height, width, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch, height, width), device=device)
    labels[:, : height // 10] = IGNORE_INDEX  # a band of void pixels, as Cityscapes' ego vehicle

    problems = {loss: backend and blv_backend_problem(backend, device) for loss, (_, backend) in LOSSES.items()}
    skipped_precisions = precision_problems(args, device)
    note = (f"{device.type} run, {size} input, {profile_name} profile (up to {args.rounds} rounds of {args.iters} "
            "iterations: --budget-s may cut them, each row's rounds say how many ran)")  # fmt: skip
    if size != "full":
        note += " (scaled down from the 512x1024 crop: not the real cost)"
    if model_name == "encdec":
        note += "; model: the self-contained encoder-decoder (torchvision not installed or not chosen)"
    data = {
        "meta": {**environment(device), "benchmark": "training", "model": model_name, "input": [batch, height, width],
                 "num_classes": NUM_CLASSES, "sigma": SIGMA, "optimizer": "SGD(lr=0.01, momentum=0.9, wd=5e-4)",
                 "size": size, "quick": args.quick, "profile": profile_name, "rounds": args.rounds,
                 "iters_per_round": args.iters, "warmup": args.warmup, "note": note,
                 "result_fields": list(RESULT_FIELDS)},
        "results": [],
    }  # fmt: skip
    log(f"Training time per iteration, {model_name}, batch {batch}x3x{height}x{width} | {stamp_line(data['meta'])}")
    log(note)
    for loss, problem in problems.items():
        if problem is not None:
            log(f"  {LOSSES[loss][0]}: skipped: {problem}")
    model = build_model(model_name).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    failed = False
    for precision, amp_dtype in PRECISIONS.items():
        rows = {loss: dict.fromkeys(RESULT_FIELDS) | {"precision": precision, "loss": loss} for loss in LOSSES}
        skip_all = skipped_precisions[precision]
        if skip_all is None and time.perf_counter() > deadline:
            skip_all = f"time budget of {args.budget_s:.0f} s used up (--budget-s)"
        for loss, row in rows.items():
            if problems[loss] is not None:
                row.update(status="skipped", reason=problems[loss])
            elif skip_all is not None:
                row.update(status="skipped", reason=skip_all)
        active = {loss: make_criterion(loss, device) for loss, row in rows.items() if row["status"] is None}
        try:
            if active:
                per_round = time_precision(model, optimizer, active, images, labels, amp_dtype, args, device, deadline)
                for loss, times in per_round.items():
                    median, p20, p80 = quantiles(times)
                    rows[loss].update(
                        status="ok", ms_per_iter=median, ms_p20=p20, ms_p80=p80, rounds=len(times), iters_per_round=args.iters
                    )  # fmt: skip
                base = rows["cross_entropy"]["ms_per_iter"]
                for row in rows.values():
                    if row["status"] == "ok" and base is not None:
                        row["overhead_pct"] = 100 * (row["ms_per_iter"] / base - 1)
        except Exception as error:  # report it with the other rows, then try the next precision
            failed = True
            message = f"{type(error).__name__}: {error}".splitlines()[0]
            for row in rows.values():
                if row["status"] is None:
                    row.update(status="failed", reason=message)
        data["results"] += rows.values()
        write_json(args.out / "training.json", data)
        if skip_all is not None:
            log(f"  {precision}: skipped: {skip_all}")
        else:
            cells = table4_cells(precision, rows)
            log("  " + " | ".join(f"{header}: {cell}" for header, cell in zip(TABLE4_HEADER, cells, strict=True)))
    log("")
    log(table4(data))
    log(f"\nwrote {args.out / 'training.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
