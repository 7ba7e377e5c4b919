"""Micro-benchmark of the BLV loss against its peers and the copy-bandwidth floor.

    python -m benchmarks.loss [--quick | --full] [--out DIR]

Times forward and forward+backward of every provider on segmentation and classification
shapes, with the median and 20%/80% quantiles, the peak extra memory, the floor's byte count
(the logits read once, the gradient written once, the labels read), its GB/s and its share of
the device-to-device copy bandwidth measured in the same run. Prints a line per provider and
case as it finishes and rewrites ``loss.json`` then; at the end prints a table and writes PNG
plots to DIR. On the CPU the shapes shrink (``--size small``), the default is a short profile
of the CPU kernel's baselines (``--full``: every case), and the GPU providers are reported as
skipped, each with its reason; no provider is ever left out. The CPU kernel's baselines beside
F.cross_entropy:

    python -m benchmarks.loss --device cpu --shapes cityscapes-cpu,classification-n8 --dtypes fp32,bf16
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from blv_kernels import BLVLoss, class_weights

from . import plots
from .common import (
    DTYPES,
    IGNORE_INDEX,
    QUANTILES,
    SIGMA,
    ArgumentParser,
    UsageError,
    at_least,
    bench,
    blv_backend_problem,
    budget_seconds,
    class_counts,
    command,
    copy_bandwidth,
    environment,
    host_loop,
    host_ms,
    log,
    names_in,
    out_dir_problem,
    peak_extra_memory,
    resolve_device,
    stamp_line,
    write_json,
)

PROG = "python -m benchmarks.loss"


@dataclass(frozen=True)
class Shape:
    """A logits shape at three sizes: the real one (GPU), a CPU one, and a smoke-test one."""

    full: tuple[int, ...]
    small: tuple[int, ...]
    tiny: tuple[int, ...]
    channels_last: bool = False


SHAPES = {
    "cityscapes-n2": Shape((2, 19, 512, 1024), (2, 19, 64, 128), (2, 19, 8, 16)),
    "cityscapes-n8": Shape((8, 19, 512, 1024), (8, 19, 64, 128), (2, 19, 8, 16)),
    "ade20k": Shape((16, 150, 512, 512), (4, 150, 32, 32), (2, 150, 4, 4)),
    "cocostuff": Shape((8, 171, 512, 512), (2, 171, 32, 32), (2, 171, 4, 4)),
    "classification": Shape((65536, 1000), (2048, 1000), (32, 1000)),
    "cityscapes-n8-cl": Shape((8, 19, 512, 1024), (8, 19, 64, 128), (2, 19, 8, 16), channels_last=True),
    "ade20k-cl": Shape((16, 150, 512, 512), (4, 150, 32, 32), (2, 150, 4, 4), channels_last=True),
    # the CPU kernel's baselines (training loops in CI on the CPU), full size on the CPU (small) too
    "cityscapes-cpu": Shape((2, 19, 256, 256), (2, 19, 256, 256), (2, 19, 8, 16)),
    "classification-n8": Shape((8, 1000), (8, 1000), (8, 1000)),
}
# --quick: the fused-kernel issue's baseline rows first, then one case of each other kind, so a
# run cut short by its time budget still has the rows that matter most.
QUICK_CASES = (
    ("cityscapes-n8", "fp32"), ("cityscapes-n8", "bf16"), ("ade20k", "fp32"), ("ade20k", "bf16"),
    ("cityscapes-n2", "fp32"), ("classification", "fp32"), ("classification", "bf16"),
    ("cityscapes-n8-cl", "bf16"), ("ade20k-cl", "fp32"), ("cocostuff", "bf16"), ("cityscapes-n8", "fp16"),
)  # fmt: skip
# torch.compile costs 10 s or more per shape and dtype: --quick compiles the baseline rows only.
QUICK_COMPILE_CASES = QUICK_CASES[:4]
# The CPU's default: the CPU kernel's baselines and one case with many classes, a minute or two
# on 2 cores (the whole grid with its compiles takes an hour there); one compiled case.
CPU_CASES = (("cityscapes-cpu", "fp32"), ("cityscapes-cpu", "bf16"), ("classification-n8", "fp32"), ("ade20k", "fp32"))
CPU_COMPILE_CASES = CPU_CASES[:1]
CPU_REPS = 5
# A compiled case starts only with this much of --budget-s left: a cold inductor compile (tens of
# seconds) would overrun the slack the GPU check leaves past the budget and get the run killed.
COMPILE_RESERVE_S = 45.0
# The released approach draws every sample on the CPU (about a second per 8x19x512x1024 call).
RELEASED_MAX_NUMEL = {"full": 8 * 19 * 512 * 1024, "quick": 2 * 19 * 512 * 1024}
RELEASED_REPS = 3
HOST_MS_DEVICE_MS = 50.0  # host_calls: the device time that host_ms's calls may take
PASSES = ("fwd", "fwd_bwd")
RESULT_FIELDS = (
    "provider", "case", "shape", "dtype", "layout", "pass", "status", "reason", "timer",
    "ms", "ms_p20", "ms_p80", "host_ms", "bytes", "gbps", "pct_copy_bandwidth", "floor_ms",
    "peak_extra_bytes", "peak_extra_vs_logits", "speedup_vs_cross_entropy",
)  # fmt: skip


def released_blv_loss(weights: torch.Tensor, sigma: float):
    """The released code's loss (grantword8/BLV, mmseg 0.x ``BlvLoss``), as it computes it.

    ``Normal(0, sigma)`` built from Python floats samples the full N*C*H*W noise on the CPU each
    call; ``clamp(-1, 1).abs()``, a copy to the device, then cross-entropy averaged over all
    positions (mmseg's ``weight_reduce_loss``).
    """
    sampler = torch.distributions.Normal(0.0, sigma)

    def loss(logits, target):
        noise = sampler.sample(logits.shape).clamp(-1, 1).abs().to(logits.device)
        shifted = logits + (noise.movedim(1, -1) * weights).movedim(-1, 1)
        return F.cross_entropy(shifted, target, ignore_index=IGNORE_INDEX, reduction="none").mean()

    return loss


@dataclass(frozen=True)
class Provider:
    label: str
    description: str
    blv_backend: str | None = None  # the blv_kernels backend it runs on, probed before timing


PROVIDERS = {
    "cross_entropy": Provider("F.cross_entropy", "plain cross-entropy, no BLV"),
    "reference": Provider("BLV reference", "BLVLoss(backend='reference'), eager", "reference"),
    "reference_compile": Provider("BLV ref compiled", "torch.compile(BLVLoss(backend='reference'))", "reference"),
    "released": Provider("released BLV", "the released code: CPU Normal noise over N*C*H*W, copied over"),
    "triton": Provider("BLV Triton", "BLVLoss(backend='triton'), the fused Triton kernel", "triton"),
    "cuda": Provider("BLV CUDA C++", "BLVLoss(backend='cuda'), the CUDA C++ kernel", "cuda"),
    "cpu": Provider("BLV CPU C++", "BLVLoss(backend='cpu'), the compiled CPU kernel", "cpu"),
}


def make_loss(provider: str, num_classes: int, device: torch.device, compile_backend: str):
    """The loss function ``(logits, target) -> loss`` of one provider."""
    counts = class_counts(num_classes)
    if provider == "cross_entropy":
        return lambda logits, target: F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    if provider == "released":
        return released_blv_loss(class_weights(counts).to(device), SIGMA)
    criterion = BLVLoss(counts, SIGMA, ignore_index=IGNORE_INDEX, backend=PROVIDERS[provider].blv_backend).to(device)
    if provider == "reference_compile":
        torch._dynamo.reset()  # a fresh compile per case: never the recompile limit's silent fallback to eager
        return torch.compile(criterion, backend=compile_backend, dynamic=False)
    return criterion


def make_inputs(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool, device: torch.device):
    """Random logits (requiring grad) and int64 labels with about 5% ignored positions."""
    generator = torch.Generator(device).manual_seed(0)
    logits = torch.randn(shape, device=device, dtype=dtype, generator=generator)
    if channels_last:
        logits = logits.to(memory_format=torch.channels_last)
    label_shape = shape[:1] + shape[2:]
    target = torch.randint(0, shape[1], label_shape, device=device, generator=generator)
    ignored = torch.rand(label_shape, device=device, generator=generator) < 0.05
    return logits.requires_grad_(), target.masked_fill_(ignored, IGNORE_INDEX)


def floor_bytes(case: dict, pass_: str) -> int:
    """Read the logits once and the int64 labels once; forward+backward also writes the gradient once."""
    numel = math.prod(case["shape"])
    logits_bytes = numel * DTYPES[case["dtype"]].itemsize
    writes = logits_bytes if pass_ == "fwd_bwd" else 0
    return logits_bytes + writes + numel // case["shape"][1] * torch.int64.itemsize


def record(provider: str, case: dict, pass_: str, copy_gbps: float, status: str, reason=None, **measured) -> dict:
    """One result row: every field of RESULT_FIELDS, None where nothing was measured."""
    row = dict.fromkeys(RESULT_FIELDS)
    num_bytes = floor_bytes(case, pass_)
    row.update(
        case, provider=provider, status=status, reason=reason, bytes=num_bytes, floor_ms=num_bytes / copy_gbps / 1e6
    )
    row["pass"] = pass_
    row.update(measured)
    return row


def case_problem(provider: str, case: dict, args, device: torch.device) -> str | None:
    """Why a provider that runs on this device is not timed on this case, if it is not."""
    if provider == "released" and device.type == "cuda":
        limit = RELEASED_MAX_NUMEL["quick" if args.quick else "full"]
        if math.prod(case["shape"]) > limit:
            return f"the released approach is timed only up to {limit:,} elements (seconds per call)"
    if provider == "reference_compile":
        key = (case["case"], case["dtype"])
        if args.profile == "quick" and key not in QUICK_COMPILE_CASES:
            return "--quick compiles only the fused-kernel issue's baseline rows (each compile takes 10 s or more)"
        if args.profile == "cpu" and key not in CPU_COMPILE_CASES:
            return "the CPU profile compiles one case (each compile takes 10 s or more; --full compiles every case)"
    return None


def host_calls(device_ms: float) -> int:
    """How many calls ``host_ms`` makes: 20, or as many as fill HOST_MS_DEVICE_MS of the device
    (one at least), so that the eager reference (50-400 ms a call) adds no more than one call."""
    return max(1, min(20, int(HOST_MS_DEVICE_MS / device_ms)))


def run_case(provider: str, case: dict, loss_fn, logits, target, args, device, copy_gbps: float) -> list[dict]:
    """Time forward (as in training: autograd records the graph) and forward+backward: two rows."""
    passes = {
        "fwd": lambda: loss_fn(logits, target),
        "fwd_bwd": lambda: loss_fn(logits, target).backward(),
    }
    passes["fwd_bwd"]()  # compile, autotune and allocate before anything is timed
    logits.grad = None
    logits_bytes = logits.numel() * logits.element_size()
    rows = []
    for pass_, fn in passes.items():
        host = None
        if provider == "released":
            ms, timer = host_loop(fn, reps=RELEASED_REPS, warmup=1, grad_to_none=[logits], device=device), "host loop"
        else:
            ms, timer = bench(fn, device=device, grad_to_none=[logits], reps=args.reps)
            host = host_ms(fn, device=device, grad_to_none=[logits], calls=host_calls(ms[0]))
        peak = peak_extra_memory(fn, device, grad_to_none=[logits])
        gbps = floor_bytes(case, pass_) / ms[0] / 1e6
        rows.append(
            record(
                provider, case, pass_, copy_gbps, "ok", timer=timer, ms=ms[0], ms_p20=ms[1], ms_p80=ms[2],
                host_ms=host, gbps=gbps,
                pct_copy_bandwidth=100 * gbps / copy_gbps, peak_extra_bytes=peak,
                peak_extra_vs_logits=None if peak is None else peak / logits_bytes,
            )
        )  # fmt: skip
    return rows


def add_speedups(rows: list[dict]) -> None:
    key = lambda r: (r["case"], r["dtype"], r["pass"])
    baseline = {key(r): r["ms"] for r in rows if r["provider"] == "cross_entropy" and r["ms"]}
    for r in rows:
        if r["ms"] and key(r) in baseline:
            r["speedup_vs_cross_entropy"] = baseline[key(r)] / r["ms"]


def _ms(row: dict) -> str:
    return f"{row['ms']:.3f} [{row['ms_p20']:.3f}, {row['ms_p80']:.3f}]"


def print_table(data: dict) -> None:
    meta = data["meta"]
    print(f"BLV loss micro-benchmark | {stamp_line(meta)}")
    print(meta["note"])
    bw = data["copy_bandwidth"]
    print(f"copy bandwidth: {bw['gbps']:.0f} GB/s ({bw['bytes'] / 1e9:.2f} GB copied in {bw['ms']:.3f} ms)")
    print("times in ms: median [20%, 80%]; GB/s and % of copy bandwidth count the floor's bytes; vs CE: speedup")
    header = (
        f"  {'provider':<18} {'fwd ms':<26} {'fwd+bwd ms':<26} {'GB/s':>7} {'%copy':>6} {'peak MiB':>9} "
        f"{'x logits':>8} {'vs CE':>6}"
    )
    by_case: dict[str, list[dict]] = {}
    for row in data["results"]:
        by_case.setdefault(f"{row['case']}-{row['dtype']}", []).append(row)
    for cid, rows in by_case.items():
        first = rows[0]
        floor = next(r["floor_ms"] for r in rows if r["pass"] == "fwd_bwd")
        print(f"\n{cid}: {tuple(first['shape'])} {first['layout']}, fwd+bwd floor {floor:.4g} ms")
        print(header)
        for provider, spec in PROVIDERS.items():
            fwd, fwd_bwd = (next(r for r in rows if r["provider"] == provider and r["pass"] == p) for p in PASSES)
            if fwd_bwd["status"] != "ok":
                print(f"  {spec.label:<18} {fwd_bwd['status']}: {fwd_bwd['reason']}")
                continue
            peak = fwd_bwd["peak_extra_bytes"]
            peak_text = (
                f"{peak / 2**20:9.1f} {fwd_bwd['peak_extra_vs_logits']:8.2f}"
                if peak is not None
                else f"{'-':>9} {'-':>8}"
            )
            speedup = fwd_bwd["speedup_vs_cross_entropy"]
            speedup_text = "-" if speedup is None else f"{speedup:.2f}"  # None: F.cross_entropy was not timed
            print(
                f"  {spec.label:<18} {_ms(fwd):<26} {_ms(fwd_bwd):<26} {fwd_bwd['gbps']:7.1f} "
                f"{fwd_bwd['pct_copy_bandwidth']:6.1f} {peak_text} {speedup_text:>6}"
            )  # fmt: skip


def compile_backend(name: str) -> str:
    """An argparse type: a torch.compile backend of this torch (checked here: a bad one failed every
    compiled case of a run, after all the others)."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())  # the default leaves out eager and aot_eager
    if name not in known:
        raise argparse.ArgumentTypeError(f"unknown backend {name!r}; known: {', '.join(known)}")
    return name


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where loss.json and plots go")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    parser.add_argument("--size", choices=("full", "small", "tiny"), help="default: full on a GPU, small on the CPU")
    profile = parser.add_mutually_exclusive_group()
    profile.add_argument("--quick", action="store_true", help="the cases of the GPU check (fits its time budget)")
    profile.add_argument(
        "--full", action="store_true", help="every case, on a CPU too (default there: a short profile)"
    )
    parser.add_argument("--shapes", help=f"comma-separated subset of {','.join(SHAPES)}")
    parser.add_argument("--dtypes", help=f"comma-separated subset of {','.join(DTYPES)}")
    parser.add_argument("--providers", help=f"comma-separated subset of {','.join(PROVIDERS)} (others: skipped)")
    parser.add_argument(
        "--compile-backend", type=compile_backend, default="inductor", help="torch.compile backend (tests: aot_eager)"
    )
    parser.add_argument(
        "--reps", type=at_least(1), help=f"timed calls per measurement on the CPU (default 10; CPU profile {CPU_REPS})"
    )
    parser.add_argument(
        "--budget-s", type=budget_seconds, default=math.inf, help="skip what is left after this many seconds"
    )
    parser.add_argument("--no-plots", action="store_true", help="write no PNG plots (they need matplotlib)")
    args = parser.parse_args(argv)
    for option, known in (("shapes", SHAPES), ("dtypes", DTYPES), ("providers", PROVIDERS)):
        value = getattr(args, option)
        if value is not None:
            setattr(args, option, names_in(option, value, known))
    out_problem = out_dir_problem(args.out)
    if out_problem is not None:
        raise UsageError(out_problem)
    return args


def choose_profile(args, device: torch.device) -> str:
    """Which cases run: "custom" (--shapes/--dtypes), "quick", "cpu" (a CPU's default) or "full"."""
    if args.shapes is not None or args.dtypes is not None:
        return "custom"
    if args.quick:
        return "quick"
    return "cpu" if device.type == "cpu" and not args.full else "full"


def select_cases(args) -> list[tuple[str, str]]:
    """The (shape, dtype) cases of ``args.profile``, in the order they run."""
    if args.profile == "quick":
        return list(QUICK_CASES)
    if args.profile == "cpu":
        return list(CPU_CASES)
    return [(s, d) for s in args.shapes or SHAPES for d in args.dtypes or DTYPES]


def progress_line(rows: list[dict]) -> str:
    """One provider on one case, as it finishes: both passes' medians, or why it was not timed."""
    fwd, fwd_bwd = rows
    case = f"{fwd['case']}-{fwd['dtype']}"
    what = f"  {case:<24} {'x'.join(map(str, fwd['shape'])):<16} {PROVIDERS[fwd['provider']].label:<18}"
    if fwd_bwd["status"] != "ok":
        return f"{what} {fwd_bwd['status']}: {fwd_bwd['reason']}"
    host = "" if fwd_bwd["host_ms"] is None else f" (host {fwd['host_ms']:.3f} / {fwd_bwd['host_ms']:.3f} ms a call)"
    return f"{what} fwd {fwd['ms']:.3f} ms, fwd+bwd {fwd_bwd['ms']:.3f} ms{host}"


@command(PROG)
def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    size = args.size or ("full" if device.type == "cuda" else "small")
    args.profile = choose_profile(args, device)
    args.reps = args.reps or (CPU_REPS if args.profile == "cpu" else 10)
    start = time.perf_counter()

    problems = {}  # provider -> why it is not timed anywhere in this run
    for provider, spec in PROVIDERS.items():
        if args.providers is not None and provider not in args.providers:
            problems[provider] = "not selected (--providers)"
        elif spec.blv_backend is not None:
            problems[provider] = blv_backend_problem(spec.blv_backend, device)
    note = f"{device.type} run, {size} shapes, {args.profile} profile"
    if size != "full":
        note += " (scaled down from the GPU shapes: these are not the real sizes)"
    if device.type != "cuda":
        note += "; GPU-only providers are skipped"

    data = {
        "meta": {**environment(device), "benchmark": "loss", "size": size, "quick": args.quick, "profile": args.profile,
                 "note": note, "sigma": SIGMA, "ignore_index": IGNORE_INDEX, "compile_backend": args.compile_backend,
                 "reps": args.reps, "quantiles": list(QUANTILES), "result_fields": list(RESULT_FIELDS)},
        "copy_bandwidth": copy_bandwidth(device, reps=args.reps),
        "providers": {name: {"label": spec.label, "description": spec.description, "available": problems.get(name) is None,
                             "reason": problems.get(name)} for name, spec in PROVIDERS.items()},
        "cases": [{"case": s, "dtype": d, "shape": list(getattr(SHAPES[s], size)),
                   "layout": "channels_last" if SHAPES[s].channels_last else "contiguous"} for s, d in select_cases(args)],
        "results": [],
    }  # fmt: skip
    log(f"BLV loss micro-benchmark | {stamp_line(data['meta'])}")
    log(f"{note}; {len(data['cases'])} cases")
    for provider, problem in problems.items():
        if problem is not None:
            log(f"  {PROVIDERS[provider].label}: skipped everywhere: {problem}")
    copy_gbps = data["copy_bandwidth"]["gbps"]
    out_json = args.out / "loss.json"
    failed = False
    # The fused kernels and F.cross_entropy first, on every case; then the eager reference and the
    # released approach (50-400 ms a call on an H100: they took most of the GPU check's first
    # budget); torch.compile, the longest to set up, last. A run cut short by its budget loses
    # the slow rows before the fused ones.
    slow = ["reference", "released"]
    sweeps = ([p for p in PROVIDERS if p not in slow + ["reference_compile"]], slow, ["reference_compile"])
    for providers in sweeps:
        for case in data["cases"]:
            shape = SHAPES[case["case"]]
            logits, target = make_inputs(tuple(case["shape"]), DTYPES[case["dtype"]], shape.channels_last, device)
            for provider in providers:
                reason = problems.get(provider) or case_problem(provider, case, args, device)
                reserve = COMPILE_RESERVE_S if provider == "reference_compile" else 0.0
                if reason is None and time.perf_counter() - start > args.budget_s - reserve:
                    reason = f"time budget of {args.budget_s:.0f} s used up (--budget-s)"
                    if reserve:
                        reason += f"; a compile starts only with {reserve:.0f} s of it left"
                if reason is not None:
                    rows = [record(provider, case, p, copy_gbps, "skipped", reason) for p in PASSES]
                else:
                    try:
                        loss_fn = make_loss(provider, logits.shape[1], device, args.compile_backend)
                        rows = run_case(provider, case, loss_fn, logits, target, args, device, copy_gbps)
                    except Exception as error:  # one provider failing must not lose the others' results
                        failed = True
                        message = f"{type(error).__name__}: {error}".splitlines()[0]
                        rows = [record(provider, case, p, copy_gbps, "failed", message) for p in PASSES]
                    logits.grad = None
                data["results"] += rows
                if problems.get(provider) is None:  # those skipped everywhere were said once, above
                    log(progress_line(rows))
                    add_speedups(data["results"])
                    write_json(out_json, data)
            del logits, target
            if device.type == "cuda":
                torch.cuda.empty_cache()
    add_speedups(data["results"])
    write_json(out_json, data)

    log("")
    print_table(data)
    print(f"\nwrote {out_json}")
    if not args.no_plots:
        print(plots.plot_loss(data, args.out))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
