"""The fused Triton loss kernel's configurations on the benchmark cases, beside the CUDA C++ backend:
what ``kernel_config``'s table and ``backend="auto"`` should be chosen from.

    python -m benchmarks.sweep --static [--cases NAME,...]            # any machine: the sm_90 SASS
    python -m benchmarks.sweep [--cases ...] [--budget-s S] [--out DIR]  # a GPU: measured

The candidates of a class count are ``kernel_config``'s choice and its variants: warps per program,
the register cap, and above 24 classes every blocking (the row spread over a program's warps, over
a warp's lanes where the classes are contiguous, and two sweeps over chunks of classes, of every
chunk width). ``--static``
compiles one training step's launches with each for sm_90 and reports registers, spills, blocks
per SM, thread-instructions per element and the model's predicted H100 time (static estimates,
``benchmarks/static_report.py``). On a GPU every candidate is launched once (its registers and
spills as the card's compiler gives them; one that spills is not timed), checked against
``kernel_config``'s result, and its step (label pass, loss pass with the gradient, the backward's
scaling with grad_output 1) is timed replayed in a CUDA graph, so that no host overhead is in the
time; the CUDA C++ backend's step, F.cross_entropy's (no BLV) and the copy floor are timed the
same way in the same run. First every case's ``kernel_config`` choice, CUDA C++ (what ``auto``
decides between) and F.cross_entropy, then the variants, case by case, until ``--budget-s``;
``sweep.json`` is rewritten after every row.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from blv_kernels import class_weights, noise
from blv_kernels.backends import get_backend
from blv_kernels.backends import triton_kernel as tk

from . import static_report
from .common import (
    IGNORE_INDEX,
    QUANTILES,
    SIGMA,
    ArgumentParser,
    UsageError,
    blv_backend_problem,
    budget_seconds,
    class_counts,
    command,
    copy_bandwidth,
    environment,
    log,
    names_in,
    out_dir_problem,
    quantiles,
    stamp_line,
    write_json,
)
from .loss import SHAPES, make_inputs

PROG = "python -m benchmarks.sweep"

# the GPU issue's cases: C = 19, 150, 171 (NCHW) and 1000 ((N, C) rows), fp32 and bf16, full size,
# and C = 19 and 150 channels_last (contiguous classes: rows over lanes, or one a thread up to 24
# classes, which the static model finds bound by its warp accesses); in the order their variants
# are timed while the budget lasts
_LAYOUTS = [("cityscapes-n8", "nchw"), ("classification", "rows"), ("cityscapes-n8", "channels_last"),
            ("ade20k", "nchw"), ("ade20k", "channels_last"), ("cocostuff", "nchw")]  # fmt: skip
CASES = {
    case.name: case
    for shape_name, layout in _LAYOUTS
    for dtype in (torch.float32, torch.bfloat16)
    for case in [static_report.Case(SHAPES[shape_name].full, dtype, layout)]
}
WARPS = (2, 4, 8)  # warps per program with one position a thread: 64, 128, 256 positions
REGISTER_CAPS = (None, 96, 128)  # ptxas's cap (None: its own choice); kernel_config's own cap is always a candidate
CHUNK_GROUPS = (1, 2, 4)  # two sweeps: groups of four classes per chunk
GRAPH_REP_MS = 100  # the calls of one graph fill about this many ms per replay


def candidates(num_classes: int, positions_contiguous: bool = True) -> list[tk.KernelConfig]:
    """``kernel_config``'s choice first, then its variants (each once): up to 24 classes, one position
    a thread over other warp counts (with contiguous classes also a row over 2 or 4 lanes); above,
    the row spread over other warp counts, one position a lane (up to 12 groups of four a thread),
    with contiguous classes also across other numbers of lanes (up to 10 groups a lane), and the
    two sweeps; each with every register cap."""
    chosen = tk.kernel_config(num_classes, positions_contiguous)
    groups = math.ceil(num_classes / 4)
    sweeps = []
    if groups <= tk.ONE_THREAD_MAX_GROUPS:
        blockings = [chosen._replace(block_p=32 * warps, num_warps=warps) for warps in WARPS]
        row_lanes = tk.ROW_LANES[:2]  # contiguous classes: a row over 2 or 4 lanes (fewer lines, more instructions)
    else:
        spread = [(warps, tk.class_blocks(groups, warps)) for warps in tk.ROW_WARPS]
        blockings = [
            tk.KernelConfig(32, warps, main, tail, 0, None) for warps, (main, tail) in spread
            if main >= warps and main + tail <= 2 * tk.ONE_THREAD_MAX_GROUPS * warps
        ]  # fmt: skip
        sweeps = [tk.KernelConfig(32 * warps, warps, 0, 0, chunk, None) for warps in WARPS for chunk in CHUNK_GROUPS]
        row_lanes = tk.ROW_LANES
    if not positions_contiguous:
        for lanes in row_lanes:
            config = tk.across_lanes(groups, lanes)
            if (
                config.main_groups >= lanes
                and config.main_groups + config.tail_groups <= 2 * tk.SPREAD_MAX_GROUPS * lanes
            ):
                blockings.append(config)
    variants = [blocking._replace(maxnreg=cap) for blocking in blockings + sweeps for cap in REGISTER_CAPS]
    return list(dict.fromkeys([chosen, *variants]))


BASELINES = {"cuda": "CUDA C++", "cross_entropy": "F.cross_entropy (no BLV)"}  # the rows without a Triton config


def describe(config: tk.KernelConfig) -> str:
    threads = 32 * config.num_warps // config.block_p  # the threads holding one position's row
    held_by = "a thread" if threads == 1 else "the warps" if config.block_p == 32 else f"{threads} lanes"
    blocks = (f"one pass {config.main_groups}+{config.tail_groups} groups, a row over {held_by}" if config.main_groups
              else f"two sweeps, chunks of {config.chunk_groups} groups")  # fmt: skip
    return f"{config.num_warps} warps, {config.block_p} positions, {blocks}, maxnreg {config.maxnreg or '-'}"


def identity(case, backend: str, config: tk.KernelConfig | None) -> dict:
    """The fields that say which row this is, on every row whatever its outcome."""
    chosen = tk.kernel_config(case.num_classes, case.positions_contiguous)
    description = describe(config) if config is not None else BASELINES[backend]
    return {"case": case.name, "backend": backend, "config": None if config is None else config._asdict(),
            "description": description, "chosen": config == chosen}  # fmt: skip


# ----------------------------------------------------------------------------------------------- static


def static_rows(case: static_report.Case) -> list[dict]:
    """Every candidate of the case, compiled for sm_90 and walked (static estimates)."""
    rows = []
    for config in candidates(case.num_classes, case.positions_contiguous):
        report = static_report.case_report(case, config)
        loss = next(k for k in report["kernels"] if k["kernel"] == tk._blv_loss_kernel.fn.__name__)
        row = {**identity(case, "triton", config), "registers": loss["registers"], "spill_bytes": loss["spill_bytes"],
               "blocks_per_sm": loss["blocks_per_sm"], "per_element": report["total_per_element"],
               "predicted_ms": report["predicted_ms"]}  # fmt: skip
        rows.append(row)
        log(
            f"  {case.name:30} {row['description']:48} {row['registers']:4d} regs {row['spill_bytes']:4d} B spilled "
            f"{row['blocks_per_sm']:2d} blk/SM {row['per_element']:6.1f}/elem predicted {row['predicted_ms']:.3f} ms"
        )
    return rows


# ----------------------------------------------------------------------------------------------- measured


def device_problem(case: static_report.Case, device: torch.device):
    """The case's problem on ``device`` as a benchmark step gives it (random logits, labels with 5%
    ignored, a long-tailed prior, sigma 6, mean), and a grad_output of exactly 1."""
    meta, _ = static_report.meta_problem(case)
    logits, target = make_inputs(case.shape, case.dtype, case.layout == "channels_last", device)
    problem = dataclasses.replace(
        meta, logits=logits.detach(), target=target, seed=noise.seed_tensor(1, device),
        variation_weight=class_weights(class_counts(case.num_classes)).to(device),
        variation_params=noise.variation_params_tensor(SIGMA, device),
    )  # fmt: skip
    return problem, torch.ones((), dtype=torch.float32, device=device)


def step(backend: str, problem, grad_output: torch.Tensor, config: tk.KernelConfig | None = None):
    """One training step's kernels on ``backend``: the forward with its gradient, the backward's scaling."""
    implementation = get_backend(backend).implementation()
    options = {} if config is None else {"config": config}

    def run():
        _, grad = implementation.forward(problem, compute_grad=True, **options)
        implementation.scale_grad_(grad, grad_output)
        return grad

    return run


def cross_entropy_step(problem):
    """PyTorch's own fused cross-entropy (no BLV) forward and backward on the same logits and labels."""
    logits = problem.logits.detach().requires_grad_(True)

    def run():
        loss = F.cross_entropy(logits, problem.target, ignore_index=problem.ignore_index)
        return torch.autograd.grad(loss, logits)[0]

    return run


def graph_ms(fn, *, retries: int = 10) -> list[float]:
    """Median and 20%/80% quantiles (over ``retries`` replays) of one call of ``fn`` in a CUDA graph
    of as many calls as fill ``GRAPH_REP_MS``: kernels only, no host overhead. Our own, not
    ``triton.testing.do_bench_cudagraph``, whose arguments differ between Triton versions."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compiled and allocated before any capture
    torch.cuda.current_stream().wait_stream(stream)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def replay(calls: int) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        return graph

    def time_ms(graph: torch.cuda.CUDAGraph) -> float:
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    single = replay(1)
    single.replay()  # the first replay uploads the graph: not timed
    calls = max(1, int(GRAPH_REP_MS / max(time_ms(single), 1e-3)))
    graph = replay(calls)
    graph.replay()
    return quantiles([time_ms(graph) / calls for _ in range(retries)])


def agrees(grad: torch.Tensor, expected: torch.Tensor) -> bool:
    """Another blocking or backend changes only the order of float32 sums: 1e-5 in float32, and in
    half precision two steps of its rounding, relative to the gradient's largest element."""
    rtol = 1e-5 if grad.dtype == torch.float32 else 2 * torch.finfo(grad.dtype).eps
    expected = expected.float()
    return torch.allclose(grad.float(), expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def measure(backend: str, case, problem, grad_output, config=None, expected=None) -> dict:
    """One row: a Triton candidate (``config``), the CUDA C++ backend or F.cross_entropy (timed only),
    checked, then timed."""
    row = identity(case, backend, config)
    # a Triton candidate: one launch of its loss pass compiles it, with the card's registers and
    # spills (None: interpreted)
    if config is not None:
        view = tk.Addressed.of(problem, compute_grad=True)  # a gradient buffer of its own, freed at once
        compiled = tk.loss_launch(problem, view, grad_output, config)()  # (grad_output: a divisor of 1)
        del view
        row.update(registers=getattr(compiled, "n_regs", None), spill_bytes=getattr(compiled, "n_spills", None))
        if row["spill_bytes"]:
            return {**row, "status": "skipped", "reason": f"spills {row['spill_bytes']} B"}
    run = cross_entropy_step(problem) if backend == "cross_entropy" else step(backend, problem, grad_output, config)
    grad = run()
    if expected is not None and backend != "cross_entropy" and not agrees(grad, expected):
        difference = (grad.float() - expected.float()).abs().max().item()
        return {**row, "status": "failed", "reason": f"gradient differs from kernel_config's by up to {difference:.3g}"}
    ms = graph_ms(run)
    return {**row, "status": "ok", "ms": ms[0], "ms_p20": ms[1], "ms_p80": ms[2]}


def measured_rows(cases: list[static_report.Case], device: torch.device, budget_s: float, data: dict,
                  out: Path) -> bool:  # fmt: skip
    """Time the candidates (module docstring's order) into ``data["results"]``. False if one failed,
    or if kernel_config's choice was timed on no case (a budget too short to measure anything)."""
    start, ok = time.perf_counter(), True
    copy_gbps = data["copy_bandwidth"]["gbps"]
    cuda_problem = blv_backend_problem("cuda", device)

    def over_budget() -> bool:
        return time.perf_counter() - start > budget_s

    for sweep in ("baseline", "variants"):
        for case in cases:
            chosen, *variants = candidates(case.num_classes, case.positions_contiguous)
            todo = [chosen, "cuda", "cross_entropy"] if sweep == "baseline" else variants
            # the case's inputs and reference gradient (a compile) only while there is budget for a row
            problem = grad_output = expected = None
            if not over_budget():
                problem, grad_output = device_problem(case, device)
                expected = step("triton", problem, grad_output)().clone()
            for config in todo:
                backend, config = (config, None) if isinstance(config, str) else ("triton", config)
                row = identity(case, backend, config)
                if backend == "cuda" and cuda_problem is not None:
                    row.update(status="skipped", reason=cuda_problem)
                elif problem is None or over_budget():
                    row.update(status="skipped", reason=f"time budget of {budget_s:.0f} s used up")
                else:
                    try:
                        row = measure(backend, case, problem, grad_output, config, expected)
                    except Exception as error:  # one candidate failing must not lose the others
                        row.update(status="failed", reason=f"{type(error).__name__}: {error}".splitlines()[0])
                row["floor_ms"] = static_report.step_bytes(case) / copy_gbps / 1e6
                ok = ok and row["status"] != "failed"
                data["results"].append(row)
                write_json(out / "sweep.json", data)
                log(progress_line(row))
            del problem, grad_output, expected
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return ok and any(r["chosen"] and r["status"] == "ok" for r in data["results"])


def progress_line(row: dict) -> str:
    what = f"  {row['case']:30} {row['description']:48}"
    if row["status"] != "ok":
        return f"{what} {row['status']}: {row['reason']}"
    regs = f"{row['registers']:4d} regs " if row.get("registers") is not None else " " * 10
    return f"{what} {regs}{row['ms']:.3f} ms [{row['ms_p20']:.3f}, {row['ms_p80']:.3f}], {row['ms'] / row['floor_ms']:.2f}x floor"


def summary(results: list[dict]) -> str:
    """Per case: kernel_config's choice, the fastest Triton candidate, CUDA C++, the copy floor."""
    lines = [
        f"{'case':30} {'floor ms':>8} {'chosen ms':>9} {'best ms':>8} {'CUDA C++':>8} {'F.ce':>8}  best Triton candidate"
    ]
    for name in dict.fromkeys(r["case"] for r in results):
        rows = [r for r in results if r["case"] == name]
        timed = [r for r in rows if r["status"] == "ok" and r["backend"] == "triton"]
        chosen = next((r["ms"] for r in timed if r["chosen"]), math.nan)
        best = min(timed, key=lambda r: r["ms"], default=None)
        cuda, cross_entropy = (next((r["ms"] for r in rows if r["backend"] == b and r["status"] == "ok"), math.nan)
                               for b in ("cuda", "cross_entropy"))  # fmt: skip
        lines.append(f"{name:30} {rows[0]['floor_ms']:8.3f} {chosen:9.3f} {best['ms'] if best else math.nan:8.3f} "
                     f"{cuda:8.3f} {cross_entropy:8.3f}  {best['description'] if best else '-'}")  # fmt: skip
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--static", action="store_true", help="static estimates of every candidate (no GPU needed)")
    parser.add_argument("--cases", help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument(
        "--budget-s", type=budget_seconds, default=math.inf, help="start no candidate after this many seconds"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where sweep.json goes")
    args = parser.parse_args(argv)
    args.cases = list(CASES) if args.cases is None else names_in("cases", args.cases, CASES)
    if args.static and os.environ.get("TRITON_INTERPRET") == "1":
        raise UsageError("--static: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    if not args.static and not torch.cuda.is_available():
        raise UsageError("the measured sweep needs a CUDA device (on any machine: --static)")
    out_problem = out_dir_problem(args.out)
    if out_problem is not None:
        raise UsageError(out_problem)
    return args


@command(PROG)
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.static:
        with static_report.own_triton_cache():
            rows = [row for name in args.cases for row in static_rows(CASES[name])]
        write_json(args.out / "sweep_static.json", {"note": "static estimates (sm_90 SASS), not measurements",
                                                    "results": rows})  # fmt: skip
        print(f"wrote {args.out / 'sweep_static.json'}")
        return 0 if all(r["spill_bytes"] == 0 for r in rows if r["chosen"]) else 1
    device = torch.device("cuda")
    data = {"meta": {**environment(device), "benchmark": "sweep", "timer": "CUDA graph replay (sweep.graph_ms)",
                     "graph_rep_ms": GRAPH_REP_MS, "quantiles": list(QUANTILES), "sigma": SIGMA,
                     "ignore_index": IGNORE_INDEX},
            "copy_bandwidth": copy_bandwidth(device), "results": []}  # fmt: skip
    log(f"kernel configuration sweep | {stamp_line(data['meta'])}")
    ok = measured_rows([CASES[n] for n in args.cases], device, args.budget_s, data, args.out)
    print(summary(data["results"]))
    if not any(r["chosen"] and r["status"] == "ok" for r in data["results"]):
        print("kernel_config's choice was timed on no case: nothing measured (--budget-s too short?)")
    print(f"wrote {args.out / 'sweep.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
