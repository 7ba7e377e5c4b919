"""Static checks of the CUDA kernels (blv_kernels/csrc/cuda/blv_kernel.cu), no GPU needed.

nvcc compiles the file for sm_80 (an object) and sm_90 (a cubin, its PTX kept) with every
warning an error, the two builds side by side. On the sm_90 cubin, every
kernel the launchers instantiate is there; none spills (ptxas, both architectures) or uses a
stack; its registers (cuobjdump --dump-resource-usage) fit the __launch_bounds__ in its PTX
(.maxntid, .minnctapersm); and the SASS holds its vector accesses as single instructions:
16-byte loads and stores of fp32 runs, 8-byte ones of fp16/bf16 runs, one store per 2-element
piece of a misaligned run, 16-byte loads and stores in the gradient scaling.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks import cuda_static_report, sass
from blv_kernels.backends import build_csrc

SOURCE = build_csrc.CSRC / "cuda" / "blv_kernel.cu"
NVCC = build_csrc.compiler_path("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
needs_binary_tools = pytest.mark.skipif(
    sass.find_tool("cuobjdump") is None or sass.find_tool("nvdisasm") is None,
    reason="cuobjdump / nvdisasm not found (CUDA toolkit or triton)",
)

# What the launchers instantiate: the loss pass for each dtype, layout (pixel/class) and
# residency (row in registers/streamed), the label pass, the gradient scaling for each dtype.
DTYPES = {"f": "float", "6__half": "__half", "13__nv_bfloat16": "__nv_bfloat16"}
EXPECTED = {
    *(f"loss_kernel<{t}, {pixel}, {stream}>" for t in DTYPES.values() for pixel in ("true", "false")
      for stream in ("true", "false")),
    *(f"scale_kernel<{t}>" for t in DTYPES.values()),
    "label_kernel",
}  # fmt: skip


def kernel_name(mangled: str) -> str:
    """blv's kernel from its mangled name: loss_kernel<float, true, false>, label_kernel, ..."""
    match = re.search(r"\d+(loss_kernel|scale_kernel|label_kernel)(?:I(.+?)E)?(?:Ev|E10BlvProblem)", mangled)
    assert match, mangled
    name, args = match.groups()
    if args is None:
        return name
    parts = re.findall(r"Lb([01])E|(f|\d+__\w+?(?=Lb|$))", args)
    values = [("true" if b == "1" else "false") if b else DTYPES[t] for b, t in parts]
    return f"{name}<{', '.join(values)}>"


@dataclass
class Build:
    sm80: subprocess.CompletedProcess  # -arch=sm_80 -c
    sm90: subprocess.CompletedProcess  # -arch=sm_90 -cubin -lineinfo, intermediates (the PTX) kept
    directory: Path


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Build:
    directory = tmp_path_factory.mktemp("cuda_static")
    common = [NVCC, *build_csrc.source_flags(), "-Werror", "all-warnings", "-Xptxas", "-v"]
    commands = [
        [*common, "-arch=sm_80", "-c", str(SOURCE), "-o", str(directory / "blv_kernel.o")],
        [*common, "-arch=sm_90", "-cubin", "-lineinfo", "--keep", f"--keep-dir={directory}", str(SOURCE), "-o",
         str(directory / "blv_kernel.cubin")],
    ]  # fmt: skip
    running = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    done = []
    for command, process in zip(commands, running, strict=True):
        stdout, stderr = process.communicate(timeout=1200)
        done.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    return Build(done[0], done[1], directory)


def test_compiles_for_sm80_and_sm90_without_warnings(build):
    for result in (build.sm80, build.sm90):
        assert result.returncode == 0, result.stderr[-4000:]
        assert "warning" not in result.stderr.lower(), result.stderr[-4000:]


@dataclass
class PtxasInfo:
    registers: int
    stack: int
    spill_stores: int
    spill_loads: int


def ptxas_info(stderr: str) -> dict[tuple[str, str], PtxasInfo]:
    """(kernel, arch) -> what ptxas -v reports of it."""
    out, current = {}, None
    for line in stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line):
            current = (kernel_name(m.group(1)), m.group(2))
        elif current and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                                         line)):  # fmt: skip
            out[current] = PtxasInfo(0, *map(int, m.groups()))
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            out[current].registers = int(m.group(1))
    return out


def launch_bounds(ptx: str) -> dict[str, tuple[int, int]]:
    """kernel -> (threads, minimum blocks per SM) of its __launch_bounds__, from the PTX."""
    bounds = {}
    for m in re.finditer(r"\.entry (\w+)\((.*?)\)\s*((?:\.\w+[^\n{]*\s*)*)\{", ptx, re.S):
        threads = re.search(r"\.maxntid (\d+), (\d+), (\d+)", m.group(3))
        blocks = re.search(r"\.minnctapersm (\d+)", m.group(3))
        assert threads, f"{kernel_name(m.group(1))} has no __launch_bounds__"
        bounds[kernel_name(m.group(1))] = (
            int(threads[1]) * int(threads[2]) * int(threads[3]),
            int(blocks[1]) if blocks else 1,
        )
    return bounds


@needs_binary_tools
def test_every_kernel_fits_its_launch_bounds_without_spills(build):
    assert build.sm80.returncode == 0 and build.sm90.returncode == 0
    info = ptxas_info(build.sm80.stderr) | ptxas_info(build.sm90.stderr)
    assert {k for k, _ in info} == EXPECTED and {a for _, a in info} == {"sm_80", "sm_90"}
    for (kernel, arch), i in info.items():
        assert (i.stack, i.spill_stores, i.spill_loads) == (0, 0, 0), (kernel, arch, i)
    bounds = launch_bounds((build.directory / "blv_kernel.ptx").read_text())
    registers = {}
    for mangled, usage in sass.resource_usage((build.directory / "blv_kernel.cubin").read_bytes()).items():
        kernel = kernel_name(mangled)
        assert usage.stack == 0 and usage.local == 0, (kernel, usage)
        registers[kernel] = usage.registers
    assert set(registers) == set(bounds) == EXPECTED
    for kernel, (threads, blocks) in bounds.items():
        # an SM's 64K registers shared by `blocks` blocks of `threads`; ptxas caps a thread at 255
        limit = min(255, 65536 // (threads * blocks))
        assert registers[kernel] <= limit, (kernel, registers[kernel], threads, blocks)
        for arch in ("sm_80", "sm_90"):
            assert info[kernel, arch].registers <= limit, (kernel, arch, info[kernel, arch].registers)


@needs_binary_tools
def test_vector_accesses_are_single_instructions(build):
    assert build.sm90.returncode == 0, build.sm90.stderr[-4000:]
    functions = sass.disassemble((build.directory / "blv_kernel.cubin").read_bytes())
    ops_by_kernel = {kernel_name(f.name): {i.opcode for i in f.instructions} for f in functions.values() if f.entry}
    assert set(ops_by_kernel) == EXPECTED
    for kernel, ops in ops_by_kernel.items():
        if kernel.startswith("loss_kernel<float"):
            # a run of 4 fp32 logits: one 16-byte read-only load (two when misaligned, funnel-
            # shifted); its gradient: one 16-byte evict-first store, or 8-byte pieces
            expected = {"LDG.E.128.CONSTANT", "STG.E.EF.128", "STG.E.EF.64"}
        elif kernel.startswith("loss_kernel"):  # fp16 / bf16 runs: 8 bytes; a 2-element piece: 4 bytes
            expected = {"LDG.E.64.CONSTANT", "STG.E.EF.64", "STG.E.EF"}
        elif kernel.startswith("scale_kernel"):
            expected = {"LDG.E.EF.128", "STG.E.EF.128"}
        else:
            expected = set()
        assert expected <= ops, (kernel, sorted(o for o in ops if o.startswith(("LDG", "STG"))))
        assert not {o for o in ops if o.startswith(("LDL", "STL"))}, kernel  # no local memory


@pytest.fixture(scope="module")
def static_reports(build) -> dict[str, tuple[bool, int, sass.KernelReport]]:
    """benchmarks/cuda_static_report.py's walk of each case: name -> (pixel layout, lanes, report)."""
    assert build.sm90.returncode == 0, build.sm90.stderr[-4000:]
    report = cuda_static_report
    kernels = report._Kernels((build.directory / "blv_kernel.cubin").read_bytes())
    return {name: (pixel, *report.case_report(kernels, dtype, pixel, num_classes))
            for dtype, pixel, num_classes, name in report.CASES}  # fmt: skip


@needs_binary_tools
def test_the_static_instruction_report_walks_every_case(static_reports):
    # benchmarks/cuda_static_report.py decides every branch of the loss kernel by rules keyed by
    # source lines; a kernel change the rules do not know raises instead of miscounting
    for _, pixel, num_classes, name in cuda_static_report.CASES:
        _, lanes, result = static_reports[name]
        assert lanes == cuda_static_report.lanes_for(pixel, num_classes)
        assert result.per_element["philox"] > 0 and result.per_element["mufu"] > 0, name
        assert result.spill_bytes == 0 and result.registers <= 255, name


@needs_binary_tools
def test_philox_rounds_stay_in_32_bit_registers(static_reports):
    # A round of Philox4x32 is two 32x32 -> 64-bit products (one IMAD.WIDE.U32 each), two 3-input
    # XORs and at most two key additions: 6 instructions, 60 a 4-word call,
    # 15 per element where one call serves 4 elements (the NCHW loss pass). The products formed
    # as 64-bit values cost 16.6 (NVVM widened the mixing to 64 bits); blv_math.h's mul_wide keeps
    # them in 32-bit registers (__umulhi).
    for name, (pixel, _, result) in static_reports.items():
        if pixel:
            assert result.per_element["philox"] <= 15.0, (name, result.per_element["philox"])
