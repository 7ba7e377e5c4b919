"""Static performance report of the fused Triton backend: what its sm_90 code costs, on a CPU.

    python -m benchmarks.static_report [--json] [--cases NAME,...]
    python -m benchmarks.static_report --all-configs [--options SET|every] [--max-classes 12288] [--json]

For each benchmark case (shape, dtype, layout) it plans the launches of one training step
exactly as ``backends/triton_kernel.py`` does (on meta tensors: ``label_launch``,
``loss_launch`` with the gradient, ``scale_launch``), compiles each for sm_90 with the argument
specialisation Triton's JIT would give those arguments (integers equal to 1 become constants,
multiples of 16 are marked so), walks the SASS of one program with ``benchmarks/sass.py`` and
reports per kernel and for the whole step: registers, spills, resident blocks per SM, dynamic
thread-instructions per logical element by class, bytes and the 128-byte lines the loss pass's
warp accesses touch per element (``line_accesses``), and the predicted H100 time. **Static
estimates, not measurements**: the model is ``sass.predict`` (132 SMs x 128 lanes x 1.755 GHz
issue, 3.0 TB/s, 0.606 lines per SM and clock), with the issue efficiency calibrated on this
kernel's H100 times (0.56 at C = 19, 0.52 at C = 150; NCHW times 0.89-1.13x the predictions:
``sass.EFFICIENCY_CALIBRATION``) and the line rate fitted to the one measured case it bounds
(``sass.H100_LINES_PER_CLOCK``). ``benchmarks/gpu_check.sh`` prints it beside the measured
times, so that the model can be recalibrated whenever a GPU runs.

Assumptions of the walk (per program): sigma = 6, so the polynomial erfinv (threshold <= 0.7)
runs; the mean reduction, no class or position weights, no label smoothing, int64 labels; the
backward's grad_output is exactly 1 (``loss.backward()``), so the scaling kernel reads only the
scalar. Loop trips come from the launch parameters (the two class sweeps of C > 384, or 10240
with strided positions, run C // (4 CHUNK_GROUPS) full chunks each, then one partial chunk).
Every program is taken to run the same path; the last, partial program of a grid and the
grid's tail on the GPU are not modelled. Must run without TRITON_INTERPRET (the interpreter
compiles nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from blv_kernels.backends import triton_kernel as tk
from blv_kernels.problem import BLVProblem

from . import sass
from .common import ArgumentParser, UsageError, at_least, command, names_in

PROG = "python -m benchmarks.static_report"
ARCH = 90
DEFAULT_MAX_CLASSES = 12288
_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
          torch.int32: "i32", torch.uint8: "u8"}  # fmt: skip


@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str  # "nchw", "channels_last" or "rows" ((N, C) logits)

    @property
    def name(self) -> str:
        dims = "x".join(map(str, self.shape))
        return f"{dims}-{_TYPES[self.dtype]}-{self.layout}"

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def num_classes(self) -> int:
        return self.shape[1]

    @property
    def positions_contiguous(self) -> bool:
        """As the launcher finds it for this shape and layout (``kernel_config``'s second argument)."""
        return tk.Addressed.of(meta_problem(self)[0], compute_grad=True).positions_contiguous


CASES = {
    case.name: case
    for shape in [(8, 19, 512, 1024), (16, 150, 512, 512)]
    for dtype in (torch.float32, torch.bfloat16)
    for layout in ("nchw", "channels_last")
    for case in [Case(shape, dtype, layout)]
} | {c.name: c for c in [Case((65536, 1000), torch.float32, "rows"), Case((65536, 1000), torch.bfloat16, "rows")]}
# the issue's budget: thread-instructions per element, forward + backward, NCHW (channels_last and rows: 1.25x)
BUDGET = {19: 75.0, 150: 100.0}


def meta_problem(case: Case) -> tuple[BLVProblem, torch.Tensor]:
    """A BLVProblem of the case's shape and layout on the meta device (no memory, no data), and a
    one-element tensor for the divisor of "mean" and the backward's grad_output."""
    logits = torch.empty(case.shape, dtype=case.dtype, device="meta")
    if case.layout == "channels_last":
        logits = logits.to(memory_format=torch.channels_last)
    target = torch.empty(case.shape[:1] + case.shape[2:], dtype=torch.int64, device="meta")
    scalar = torch.empty((), dtype=torch.float32, device="meta")
    return BLVProblem(
        logits=logits, target=target, variation_weight=torch.empty(case.num_classes, device="meta"),
        class_weight=None, position_weight=None, seed=torch.empty((), dtype=torch.int64, device="meta"),
        variation_params=torch.empty(2, device="meta"), avg_factor=None, offset=0, ignore_index=255,
        reduction="mean", mode="abs", label_smoothing=0.0, loss_dtype=case.dtype,
    ), scalar  # fmt: skip


def specialise(launch: tk.Launch) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as Triton's JIT specialises ``launch.args``: tensors are
    16-byte aligned pointers, integers equal to 1 constants, multiples of 16 marked divisible."""
    fn = launch.kernel
    constexpr_names = {fn.arg_names[i] for i in fn.constexprs}
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        value = launch.args[name]
        if name in constexpr_names or value is None:
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                constexprs[name] = 1
            else:
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    return signature, constexprs, attrs


PHILOX = (sass.python_function_lines(tk.__file__, "_philox"),)  # our own Philox, for the "philox" class
_STORE = sass.side_with(lambda i: i.base == "STG", "a global store")


def _line(function, text: str) -> tuple[str, int]:
    return (tk.__file__, sass.line_of(function, text))


def _walk_options(case: Case, launch: tk.Launch) -> dict:
    """Loop trips and branch decisions of one program, from the launch parameters (module docstring)."""
    trips, branches, default = {}, {}, [sass.skip_slow_paths, _partial_exit]
    if launch.kernel is tk._blv_loss_kernel:
        # the uniform branch on the erfinv: sigma = 6 takes the side with the polynomial (found by the
        # polynomial's own line: Triton 3.6 gives inlined code no location at its call site)
        branches[_line(tk._blv_loss_kernel, "if threshold <= _POLY_MAX:")] = sass.runs(
            _line(tk._variation, "e = t * _horner8(t * t")
        )
        # a masked gradient store that ptxas puts behind a branch (Triton 3.6): some lane stores
        branches[_line(tk._store_tile, "tl.store(tl.reshape(p, flat), tl.reshape(b, flat), mask=")] = _STORE
        full_chunks = case.num_classes // (4 * max(launch.args["CHUNK_GROUPS"], 1))  # then a masked partial one
        sweeps = [_line(tk._row_loss, sweep) for sweep in ("# first sweep", "# second sweep")]
        trips.update(dict.fromkeys(sweeps, full_chunks))
        # the guard that skips a sweep with no full chunk, where ptxas attributes it to a line of the
        # loop's body (Triton 3.6): the side holding the loop runs when there are full chunks
        default += [(sass.runs if full_chunks else sass.skips)(line) for line in sweeps]
    if launch.kernel is tk._scale_kernel:  # grad_output == 1: the scaling is skipped
        branches[_line(tk._scale_kernel, "if scale != 1.0:")] = sass.skips(_line(tk._scale_kernel, "b_g = tl.load("))
    return dict(trips=trips, branches=branches, default=default)


def _partial_exit(branch: sass.Branch) -> sass.Decision | None:
    """``@P EXIT`` lets the lanes that store a program's scalar result go on: the warp runs both ways."""
    return sass.Decision.BOTH if branch.instruction.base == "EXIT" else None


def compile_launch(launch: tk.Launch) -> sass.CompiledKernel:
    """``launch`` compiled for sm_90 with the argument specialisation Triton's JIT would give it."""
    signature, constexprs, attrs = specialise(launch)
    return sass.compile_triton(launch.kernel, signature, constexprs, num_warps=launch.num_warps,
                               num_stages=launch.num_stages, maxnreg=launch.maxnreg, arch=ARCH, attrs=attrs)  # fmt: skip


@dataclass(frozen=True)
class KernelRow:
    kernel: str  # the @triton.jit function
    report: sass.KernelReport  # per logical element of the whole tensor
    memory_lines: list[str]  # what the executed memory instructions are: the kernel-file source lines
    lines_per_element: float | None = None  # the loss pass: line_accesses


# ----------------------------------------------------------------------------------------------
# The loss pass's warp accesses of the logits and the gradient

LINE_BYTES = 128  # a cache line: the L1 takes one wavefront per line a warp's access touches
_IR_TYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_BLOCKED = re.compile(
    r"^(#blocked\d*) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\], threadsPerWarp = \[([\d, ]+)\], "
    r"warpsPerCTA = \[([\d, ]+)\]", re.M,
)  # fmt: skip
_TENSOR_ACCESS = re.compile(r"tt\.(?:load|store) [^\n]*: tensor<(\d+)x!tt\.ptr<(\w+)>, (#blocked\d*)>")


def _tiles(launch: tk.Launch) -> list[tuple[int, int, int, int]]:
    """(first group, groups, loads, stores) of each [groups, BLOCK_P] tile of classes a program of
    the loss pass moves through memory, four times (one tile per Philox word)."""
    a = launch.args
    if a["MAIN_GROUPS"]:
        tail = [(a["MAIN_GROUPS"], a["TAIL_GROUPS"], 1, 1)] if a["TAIL_GROUPS"] else []
        return [(0, a["MAIN_GROUPS"], 1, 1), *tail]
    chunk = a["CHUNK_GROUPS"]  # two sweeps: the first loads, the second loads again and stores
    return [(first, chunk, 2, 1) for first in range(0, -(-a["C"] // 4), chunk)]


def check_flat_tiles(compiled: sass.CompiledKernel, launch: tk.Launch) -> None:
    """``line_accesses``' premise, in the compiled kernel's TTGIR: every load and store of a tile of
    the logits or the gradient is one-dimensional, one element a thread in turn."""
    layouts = {name: (spt, tpw, wpc) for name, spt, tpw, wpc in _BLOCKED.findall(compiled.ttgir)}
    sizes = {groups * launch.args["BLOCK_P"] for _, groups, _, _ in _tiles(launch)}
    element = _IR_TYPES[launch.args["x_ptr"].dtype]
    found = [
        layouts[name]
        for size, ty, name in _TENSOR_ACCESS.findall(compiled.ttgir)
        if ty == element and int(size) in sizes
    ]
    expected = ("1", "32", str(launch.num_warps))
    if not found or any(layout != expected for layout in found):
        raise RuntimeError(f"the loss pass's tiles are not laid out flat, one element a thread: {set(found)}")


def line_accesses(launch: tk.Launch, programs: int = 32) -> float:
    """Lines of LINE_BYTES touched by the loss pass's warp loads of the logits and stores of the
    gradient, per logical element (mean over ``programs`` programs spread over the grid). A tile
    [G, P] is accessed flat (``check_flat_tiles``): its element (g, p) at g * P + p, one a thread in
    turn, so one warp access holds 32 consecutive flat elements. Base addresses aligned to a line."""
    a = launch.args
    block_p, threads, num_classes, positions = a["BLOCK_P"], 32 * launch.num_warps, a["C"], a["S"]
    item = a["x_ptr"].element_size()
    (blocks, runs), tiles = launch.grid, _tiles(launch)
    writes = a["grad_ptr"] is not None
    stored = "g" if writes and not a["GRAD_LIKE_X"] else "x"  # the gradient's strides
    strides = {t: [a[f"stride_{t}{d}"] for d in "ncs"] for t in {"x", stored}}
    lines = elements = 0
    for index in range(programs):
        pid, n = index * blocks // programs, index * runs // programs
        first_position = pid * block_p
        elements += num_classes * max(0, min(block_p, positions - first_position))
        for start, groups, loads, stores in tiles:
            size = groups * block_p
            for first in range(0, max(size, threads), 32):  # a warp's access (replicated below the threads)
                flat = [divmod(f % size, block_p) for f in range(first, first + 32)]
                for k in range(4):  # the same access of each Philox word's tile
                    held = [(4 * (start + g) + k, first_position + p) for g, p in flat]
                    held = [(c, s) for c, s in held if c < num_classes and s < positions]
                    for tensor, times in (("x", loads), (stored, stores if writes else 0)):
                        sn, sc, ss = strides[tensor]
                        lines += times * len({(n * sn + c * sc + s * ss) * item // LINE_BYTES for c, s in held})
    return lines / elements


def kernel_rows(case: Case, config: tk.KernelConfig | None = None) -> list[KernelRow]:
    """The launches of one training step (forward with gradient, backward with grad_output 1), walked;
    the loss pass with ``config`` instead of ``kernel_config``'s when given."""
    problem, grad_output = meta_problem(case)
    view = tk.Addressed.of(problem, compute_grad=True)
    label = tk.label_launch(problem, view)
    loss = tk.loss_launch(problem, view, grad_output, config)
    scale = tk.scale_launch(view.grad, grad_output)
    rows = []
    for launch in (label, loss, scale):
        compiled = compile_launch(launch)
        lines = None
        if launch is loss:
            check_flat_tiles(compiled, launch)
            lines = line_accesses(launch)
        walk = sass.walk(sass.disassemble(compiled.cubin), compiled.name, **_walk_options(case, launch))
        # one program's walk over the elements a program covers on average: per element of the whole tensor
        report = sass.report(
            walk, num_warps=compiled.num_warps, elements=case.elements / (launch.grid[0] * launch.grid[1]),
            resources=sass.resource_usage(compiled.cubin)[compiled.name], dynamic_shared=compiled.shared,
            philox=PHILOX,
        )  # fmt: skip
        memory_lines = sorted({_source_text(i) for i in walk.executions if sass.classify(i) == "memory"})
        rows.append(KernelRow(launch.kernel.fn.__name__, report, memory_lines, lines))
    return rows


def _source_text(instruction: sass.Instruction) -> str:
    """The kernel-file line an instruction comes from, as text (parameter loads have none)."""
    here = next((loc for loc in instruction.locations if loc.file == tk.__file__), None)
    return _SOURCE[here.line - 1].strip() if here else "(kernel parameters)"


_SOURCE = Path(tk.__file__).read_text().splitlines()


def step_bytes(case: Case) -> int:
    """DRAM bytes of one training step: the logits read once, the gradient written once, the labels read twice."""
    positions = case.elements // case.num_classes
    return 2 * case.elements * case.dtype.itemsize + 2 * positions * 8


def case_report(case: Case, config: tk.KernelConfig | None = None) -> dict:
    rows = kernel_rows(case, config)
    per_element = {cls: sum(r.report.per_element[cls] for r in rows) for cls in sass.CLASSES}
    total = sum(per_element.values())
    efficiency = sass.calibrated_efficiency(case.num_classes)
    bytes_moved = step_bytes(case)
    lines = next(r.lines_per_element for r in rows if r.lines_per_element is not None)
    prediction = sass.predict(total * case.elements, bytes_moved, efficiency, lines=lines * case.elements)
    return {
        "case": case.name, "shape": list(case.shape), "dtype": _TYPES[case.dtype], "layout": case.layout,
        "kernels": [{"kernel": r.kernel, "registers": r.report.registers, "spill_bytes": r.report.spill_bytes,
                     "blocks_per_sm": r.report.occupancy.blocks,
                     "warps_per_sm": r.report.occupancy.blocks * r.report.num_warps, "per_element": r.report.per_element,
                     "total": r.report.total, "memory_lines": r.memory_lines,
                     "lines_per_element": r.lines_per_element} for r in rows],
        "per_element": per_element, "total_per_element": total, "bytes_per_element": bytes_moved / case.elements,
        "efficiency": efficiency, "predicted_ms": prediction.ms, "issue_ms": prediction.issue_ms,
        "memory_ms": prediction.memory_ms, "lines_per_element": lines, "access_ms": prediction.access_ms,
        "bound": prediction.bound,
    }  # fmt: skip


# The options that take registers in the loss kernel, and the sets of them whose registers and
# spills the report checks (ptxas is not monotonic: one option alone may spill where more do not)
OPTIONS = ("class_weight", "clamp", "position_weight", "label_smoothing", "reduction_none")
OPTION_SETS = {
    "defaults": (), **{name: (name,) for name in OPTIONS},
    "class_weight+clamp": ("class_weight", "clamp"),
    "class_weight+label_smoothing": ("class_weight", "label_smoothing"),
    "clamp+label_smoothing": ("clamp", "label_smoothing"),
    "all but class_weight": OPTIONS[1:],
    "all but label_smoothing": ("class_weight", "clamp", "position_weight", "reduction_none"),
    "all": OPTIONS,
}  # fmt: skip


def with_options(problem: BLVProblem, options: tuple[str, ...]) -> BLVProblem:
    """``problem`` (on the meta device) with ``options`` (names in OPTIONS) on."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; choose from {OPTIONS}")
    meta = dict(dtype=torch.float32, device="meta")
    change = dict(
        class_weight=torch.empty(problem.num_classes, **meta), clamp=dict(mode="clamp"),
        position_weight=torch.empty(problem.target.shape, **meta), label_smoothing=0.1,
        reduction_none=dict(reduction="none"),
    )  # fmt: skip
    fields = {}
    for name in options:
        fields.update(change[name] if isinstance(change[name], dict) else {name: change[name]})
    return replace(problem, **fields)


def config_rows(max_classes: int = DEFAULT_MAX_CLASSES, options: tuple[str, ...] = ()) -> list[dict]:
    """Registers and spills of the loss kernel for every configuration ``kernel_config`` gives for
    C in [1, max_classes] (with and without a partial chunk or a full main block), fp32 and bf16,
    NCHW, channels_last and rows (strided positions take more registers for their addresses),
    with ``options`` (names in OPTIONS; none: no weights, no label smoothing, the mean)."""

    def case(layout: str, num_classes: int, dtype: torch.dtype) -> Case:
        return Case((8192, num_classes) if layout == "rows" else (2, num_classes, 64, 64), dtype, layout)

    def launch(layout: str, num_classes: int, dtype: torch.dtype) -> tuple[tk.KernelConfig, tk.Launch]:
        problem, scalar = meta_problem(case(layout, num_classes, dtype))
        problem = with_options(problem, options)
        view = tk.Addressed.of(problem, compute_grad=True)
        config = tk.kernel_config(num_classes, view.positions_contiguous, tk.register_pressure(problem))
        return config, tk.loss_launch(problem, view, scalar, config)

    chosen = {}  # the first C of each kernel (configuration, partial chunk, full main block), per layout
    for layout in ("nchw", "channels_last", "rows"):
        for num_classes in range(1, max_classes + 1):
            config, planned = launch(layout, num_classes, torch.float32)
            chosen.setdefault((layout, config, planned.args["TAIL_CHUNK"], planned.args["MAIN_FULL"]), num_classes)
    rows = []
    for (layout, config, partial, _), num_classes in sorted(chosen.items(), key=lambda item: item[1]):
        for dtype in (torch.float32, torch.bfloat16):
            compiled = compile_launch(launch(layout, num_classes, dtype)[1])
            resources = sass.resource_usage(compiled.cubin)[compiled.name]
            rows.append({"num_classes": num_classes, "options": list(options), "config": config._asdict(),
                         "partial_chunk": partial, "dtype": _TYPES[dtype], "layout": layout,
                         "registers": resources.registers, "spill_bytes": resources.spill_bytes})  # fmt: skip
    return rows


def format_report(reports: list[dict]) -> str:
    classes = [c for c in sass.CLASSES if any(r["per_element"][c] > 0.05 for r in reports)]
    lines = [
        "Static estimate (sm_90 SASS, no GPU): fused Triton BLV, one training step (forward with gradient, "
        "backward with grad_output 1), sigma 6, mean, int64 labels",
        f"{'case':32} {'kernel':18} {'regs':>4} {'spill':>5} {'blk/SM':>6} " + " ".join(f"{c:>7}" for c in classes)
        + f" {'total':>7}",
    ]  # fmt: skip
    for r in reports:
        for k in r["kernels"]:
            lines.append(f"{r['case']:32} {k['kernel']:18} {k['registers']:4d} {k['spill_bytes']:5d} "
                         f"{k['blocks_per_sm']:6d} " + " ".join(f"{k['per_element'][c]:7.1f}" for c in classes)
                         + f" {k['total']:7.1f}")  # fmt: skip
        lines.append(f"{r['case']:32} {'step':18} {'':4} {'':5} {'':6} "
                     + " ".join(f"{r['per_element'][c]:7.1f}" for c in classes)
                     + f" {r['total_per_element']:7.1f}   {r['bytes_per_element']:.2f} B and "
                       f"{r['lines_per_element']:.2f} lines/elem, predicted H100 "
                       f"{r['predicted_ms']:.3f} ms ({r['bound']}-bound, efficiency {r['efficiency']:.2f})")  # fmt: skip
    return "\n".join(lines)


@contextlib.contextmanager
def own_triton_cache():
    """A Triton cache of the report's own: Triton's cache is keyed by the source, not its file, so a
    cubin cached from another checkout would carry that checkout's paths in its line info, which
    the walk decides branches by."""
    with tempfile.TemporaryDirectory(prefix="blv-static-report-") as cache:
        before = os.environ.get("TRITON_CACHE_DIR")
        os.environ["TRITON_CACHE_DIR"] = cache
        try:
            yield
        finally:
            if before is None:
                del os.environ["TRITON_CACHE_DIR"]
            else:
                os.environ["TRITON_CACHE_DIR"] = before


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--cases", help=f"comma-separated case names (default: all): {', '.join(CASES)}")
    parser.add_argument(
        "--all-configs",
        action="store_true",
        help="instead: registers and spills of every loss-kernel configuration for C in [1, --max-classes]",
    )
    parser.add_argument("--max-classes", type=at_least(1), help=f"with --all-configs (default {DEFAULT_MAX_CLASSES})")
    parser.add_argument(
        "--options", help=f"with --all-configs: an option set, or 'every' (each in turn): {', '.join(OPTION_SETS)}"
    )
    args = parser.parse_args(argv)
    # an option of the other report would be ignored: refused, so that nobody reads a report they did not ask for
    if args.all_configs and args.cases is not None:
        raise UsageError("--cases: not with --all-configs (it reports every configuration, not cases)")
    if not args.all_configs:
        given = [option for option in ("max_classes", "options") if getattr(args, option) is not None]
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')}: only with --all-configs")
    if args.options is None:
        args.options = "defaults"
    if args.max_classes is None:
        args.max_classes = DEFAULT_MAX_CLASSES
    if args.options != "every" and args.options not in OPTION_SETS:
        raise UsageError(f"unknown option set {args.options!r}; choose from 'every', {', '.join(OPTION_SETS)}")
    args.cases = list(CASES) if args.cases is None else names_in("cases", args.cases, CASES)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise UsageError("unset TRITON_INTERPRET: the interpreter compiles nothing")
    for tool in ("nvdisasm", "cuobjdump"):
        if sass.find_tool(tool) is None:
            raise UsageError(f"{tool} not found (Triton bundles it with its NVIDIA backend)")
    return args


@command(PROG)
def main(argv=None) -> int:
    args = parse_args(argv)
    with own_triton_cache():
        if args.all_configs:
            sets = OPTION_SETS.values() if args.options == "every" else [OPTION_SETS[args.options]]
            rows = [row for options in sets for row in config_rows(args.max_classes, options)]
            print(json.dumps(rows, indent=1) if args.json else "\n".join(
                f"C={r['num_classes']:5d} {r['dtype']} {r['layout']:5} {'+'.join(r['options']) or 'defaults'} "
                f"{r['config']} partial={r['partial_chunk']}: {r['registers']} registers, {r['spill_bytes']} B spilled"
                for r in rows))  # fmt: skip
            return 1 if any(r["spill_bytes"] for r in rows) else 0
        reports = [case_report(CASES[n]) for n in args.cases]
    print(json.dumps(reports, indent=1) if args.json else format_report(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
