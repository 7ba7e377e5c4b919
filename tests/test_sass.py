"""benchmarks/sass.py on small kernels whose SASS structure is known by construction.

Triton kernels are compiled for sm_90 in a child process without TRITON_INTERPRET (which the
test session sets on a CPU machine, and under which nothing compiles): this file, run as a
script, writes their cubins. CUDA C++ goes through nvcc -cubin -lineinfo. No GPU is needed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton
import triton.language as tl

from benchmarks import sass
from benchmarks.sass import Decision, line_of, runs, skips

THIS_FILE = Path(__file__).resolve()
TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
BYTES_PER_INSTRUCTION = 16  # sm_90 instructions are 128 bits


@triton.jit
def _loop_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    # a scalar sum per iteration goes through shared memory and barriers: ptxas leaves the loop
    # rolled (a plain elementwise body it would unroll 4x, with remainder branches)
    total = 0.0
    for start in range(0, n, BLOCK):
        o = start + tl.arange(0, BLOCK)
        total += tl.sum(tl.exp(tl.load(x_ptr + o, mask=o < n, other=0.0)), 0)
    tl.store(y_ptr, total)


@triton.jit
def _branch_kernel(x_ptr, flag_ptr, y_ptr, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + o)
    if tl.load(flag_ptr) > 0:  # one scalar for the whole program: a uniform branch
        y = tl.exp(x) * 3.0
    else:
        y = tl.sqrt(x) + 1.0
    tl.store(y_ptr + o, y)


@triton.jit
def _philox_kernel(y_ptr, seed, BLOCK: tl.constexpr):
    c = tl.arange(0, BLOCK).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c, c + 1, c + 2, c + 3)
    tl.store(y_ptr + tl.arange(0, BLOCK), r0 ^ r1 ^ r2 ^ r3)


TRITON_KERNELS = {
    "loop": (_loop_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"}, {"BLOCK": 128}),
    "branch": (_branch_kernel, {"x_ptr": "*fp32", "flag_ptr": "*i32", "y_ptr": "*fp32"}, {"BLOCK": 128}),
    "philox": (_philox_kernel, {"y_ptr": "*u32", "seed": "i32"}, {"BLOCK": 128}),
}
LOOP_LINE = line_of(_loop_kernel, "for start in range(")
SUM_LINE = line_of(_loop_kernel, "total += tl.sum(")
STORE_LINE = line_of(_loop_kernel, "tl.store(y_ptr, total)")
IF_LINE = line_of(_branch_kernel, "if tl.load(flag_ptr) > 0:")
THEN_LINE = line_of(_branch_kernel, "y = tl.exp(x) * 3.0")
ELSE_LINE = line_of(_branch_kernel, "y = tl.sqrt(x) + 1.0")

CUDA_SOURCE = r"""
#include <stdint.h>

__device__ __forceinline__ uint32_t mulhi(uint32_t a, uint32_t b) { return __umulhi(a, b); }

// one Philox-like round: the "philox" source of the classification test
__device__ __forceinline__ uint32_t mix(uint32_t c) {
  return mulhi(c, 0xD2511F53u) ^ (c * 0xCD9E8D57u);
}

__global__ void row_sums(const float* __restrict__ x, float* __restrict__ out, int rows, int n) {
  float acc = 0.f;
#pragma unroll 1
  for (int r = 0; r < rows; ++r) {  // row loop
    const float v = x[r * n + threadIdx.x];
    if (v > 0.f) {  // lane-divergent
      acc += __expf(v) * __logf(v + 2.f);  // then arm
    } else {
      acc += (float)mix(__float_as_uint(v));
    }
  }
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if ((threadIdx.x & 31) == 0) out[threadIdx.x >> 5] = acc;  // lane 0 stores
}
"""

# A hand-written nvdisasm listing: a kernel calling a subroutine, an inlined location chain, a
# uniform-predicate branch, and the padding after the last RET.
SYNTHETIC_SASS = """\
//--------------------- .text.kern              --------------------------
\t.section\t.text.kern,"ax",@progbits
        .global         kern
        .type           kern,@function
        .other          kern,@"STO_CUDA_ENTRY STV_DEFAULT"
kern:
.text.kern:
\t//## File "/src/k.py", line 3
        /*0000*/                   S2R R0, SR_TID.X ;
\t//## File "/lib/helper.py", line 40 inlined at "/src/k.py", line 5
\t//## File "/src/k.py", line 5
        /*0010*/                   IMAD.WIDE.U32 R2, R0, 0x4, RZ ;
        /*0020*/                   MOV R8, 0x40 ;
        /*0030*/                   CALL.REL.NOINC `($__internal_0_$__sub) ;
\t//## File "/src/k.py", line 7
        /*0040*/              @!UP1 BRA `(.L_x_0) ;
        /*0050*/                   FADD R1, R1, 1 ;
.L_x_0:
        /*0060*/                   EXIT ;
        .type           $__internal_0_$__sub,@function
$__internal_0_$__sub:
        /*0070*/                   IADD3 R9, R9, 0x1, RZ ;
        /*0080*/                   RET.REL.NODEC R8 `(kern) ;
.L_x_1:
        /*0090*/                   BRA `(.L_x_1);
        /*00a0*/                   NOP;
.L_x_2:
//--------------------- SYMBOLS --------------------------
"""


def _listing(*rows: str) -> str:
    """A one-kernel nvdisasm listing of /src/k.py: each row a label (".L_x_0:") or "line: instruction"."""
    out = ["//--------------------- .text.kern --------------------------", "        .type           kern,@function",
           '        .other          kern,@"STO_CUDA_ENTRY STV_DEFAULT"', "kern:"]  # fmt: skip
    instructions = [row for row in rows if not row.endswith(":")]
    for row in rows:
        if row.endswith(":"):
            out.append(row)
        else:
            line, text = row.split(": ", 1)
            address = BYTES_PER_INSTRUCTION * instructions.index(row)
            out += [f'\t//## File "/src/k.py", line {line}', f"        /*{address:04x}*/                   {text} ;"]
    return "\n".join(out) + "\n"


# The loop shapes ptxas emits besides the do-while (test and back edge in one conditional BRA):
# the test at the bottom by a predicated EXIT (nothing follows the loop) and an unconditional
# back edge; the test at the top (a while loop: the test runs once more than the body).
BOTTOM_EXIT_LOOP = _listing(
    "2: S2R R0, SR_TID.X", "3: ISETP.GE.AND P0, PT, R0, 0x1, PT", "3: @!P0 EXIT",
    ".L_x_0:", "4: FADD R1, R1, 1", "3: ISETP.GE.AND P1, PT, R1, R0, PT", "3: @P1 EXIT", "3: BRA `(.L_x_0)",
)  # fmt: skip
WHILE_LOOP = _listing(
    ".L_x_0:", "3: ISETP.GE.AND P0, PT, R1, R0, PT", "3: @P0 BRA `(.L_x_1)", "4: FADD R1, R1, 1", "3: BRA `(.L_x_0)",
    ".L_x_1:", "5: EXIT",
)  # fmt: skip


def _compile_triton_kernels(out: Path) -> None:
    """Run as a script, without TRITON_INTERPRET: every Triton cubin the tests read, with its metadata."""
    for name, (fn, signature, constexprs) in TRITON_KERNELS.items():
        _save(out, name, sass.compile_triton(fn, signature, constexprs))


def _save(out: Path, name: str, kernel: sass.CompiledKernel, **extra) -> None:
    (out / f"{name}.cubin").write_bytes(kernel.cubin)
    meta = {"name": kernel.name, "num_warps": kernel.num_warps, "shared": kernel.shared, **extra}
    (out / f"{name}.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def triton_dir(tmp_path_factory) -> Path:
    for tool in ("nvdisasm", "ptxas", "cuobjdump"):
        if sass.find_tool(tool) is None:
            pytest.skip(f"{tool} not found (neither bundled with Triton nor on PATH)")
    out = tmp_path_factory.mktemp("triton_cubins")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # a cache of its own: Triton's cache is keyed by the source, not its file, so a cubin cached
    # from another checkout would carry that checkout's paths in its line info
    env["TRITON_CACHE_DIR"] = str(out / "triton-cache")
    # run as a script, this file imports benchmarks/ from the repository (pytest's pythonpath)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(THIS_FILE.parents[1]), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, str(THIS_FILE), str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _load(directory: Path, name: str) -> tuple[dict[str, sass.Function], dict]:
    """The functions of a cubin the child process wrote, and its metadata."""
    meta = json.loads((directory / f"{name}.json").read_text())
    return sass.disassemble((directory / f"{name}.cubin").read_bytes()), meta


@pytest.fixture(scope="module")
def cuda_kernel(tmp_path_factory) -> tuple[Path, bytes, dict[str, sass.Function]]:
    """The source file of CUDA_SOURCE, its cubin, its functions."""
    for tool in ("nvcc", "nvdisasm", "cuobjdump"):
        if sass.find_tool(tool) is None:
            pytest.skip(f"{tool} not found")
    path = tmp_path_factory.mktemp("cuda") / "row_sums.cu"
    path.write_text(CUDA_SOURCE)
    cubin = sass.compile_cuda(path)
    return path, cubin, sass.disassemble(cubin)


def _executed(result: sass.Walk, opcode: str) -> int:
    return sum(n for instruction, n in result.executions.items() if instruction.opcode == opcode)


# ----------------------------------------------------------------------------------------------
# Parsing


def test_parse_sass_functions_locations_and_padding():
    functions = sass.parse_sass(SYNTHETIC_SASS)
    kern, sub = functions["kern"], functions["$__internal_0_$__sub"]
    assert kern.entry and not sub.entry
    assert [i.address for i in kern.instructions] == [0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60]
    assert [i.opcode for i in sub.instructions] == ["IADD3", "RET.REL.NODEC"]  # self-loop BRA and NOP dropped
    imad = kern.instructions[1]
    assert (imad.opcode, imad.base, imad.operands) == ("IMAD.WIDE.U32", "IMAD", "R2, R0, 0x4, RZ")
    assert imad.locations == (sass.Location("/lib/helper.py", 40), sass.Location("/src/k.py", 5))
    assert kern.instructions[2].locations == imad.locations  # a location holds until the next one
    branch = kern.instructions[4]
    assert (branch.guard, branch.opcode, branch.target) == ("@!UP1", "BRA", ".L_x_0")
    assert kern.instructions[3].target == "$__internal_0_$__sub"
    assert sub.instructions[0].locations == ()  # a subroutine starts without line info


def test_walk_counts_the_callee_on_the_path():
    functions = sass.parse_sass(SYNTHETIC_SASS)
    taken = sass.walk(functions, branches={7: Decision.TAKEN})
    not_taken = sass.walk(functions, branches={("k.py", 7): Decision.NOT_TAKEN})
    # S2R, IMAD, MOV, CALL, BRA, EXIT + the callee's IADD3, RET; FADD only when not taken
    assert taken.warp_instructions == 8
    assert not_taken.warp_instructions == 9
    assert taken.thread_instructions(num_warps=4) == 8 * 32 * 4
    assert taken.decision_at(0x40) is Decision.TAKEN


def test_disassembly_of_a_real_cubin_drops_the_padding(triton_dir):
    functions, meta = _load(triton_dir, "loop")
    kernel = functions[meta["name"]]
    assert kernel.entry
    assert kernel.instructions[-1].opcode == "EXIT"
    assert all(i.opcode != "NOP" for i in kernel.instructions)
    shuffle = next(i for i in kernel.instructions if i.opcode == "SHFL.BFLY")
    # tl.sum's shuffle: innermost in Triton's standard.py, inlined at the kernel's line, which
    # Triton 3.9 records; Triton 3.6 records no call site of inlined code (the GPU machine's: the
    # static report decides its branches without them)
    assert shuffle.locations[0].file.endswith("triton/language/standard.py")
    call_sites = [loc for loc in shuffle.locations if loc.file == str(THIS_FILE)]
    if TRITON_VERSION >= (3, 9):
        assert call_sites == [sass.Location(str(THIS_FILE), SUM_LINE)]
    else:
        assert call_sites in ([], [sass.Location(str(THIS_FILE), SUM_LINE)])


# ----------------------------------------------------------------------------------------------
# Loops, branches, errors


def test_loop_count_is_prologue_plus_trips_times_body(triton_dir):
    functions, meta = _load(triton_dir, "loop")
    kernel = functions[meta["name"]]
    cfg = sass.ControlFlowGraph(kernel)
    assert len(cfg.loops) == 1, "ptxas was expected to leave this loop rolled"
    (loop,) = cfg.loops
    latch = loop.latches[0].terminator
    assert latch.locations[0].line == LOOP_LINE
    body = (latch.address - loop.header.start) // BYTES_PER_INSTRUCTION + 1  # one contiguous range of code
    assert loop.size == body

    def count(trips):
        return sass.walk(functions, trips={LOOP_LINE: trips}, branches={STORE_LINE: Decision.BOTH}).warp_instructions

    assert count(5) - count(3) == 2 * body
    assert count(3) == count(1) + 2 * body
    # no trip: the guard on the loop's line jumps over it; what runs is the code up to the guard
    # and everything from its target on
    guard = next(i for i in kernel.instructions if i.opcode == "BRA" and i.predicated)
    assert guard.locations[0].line == LOOP_LINE
    target = kernel.labels[guard.target]
    assert count(0) == sum(i.address <= guard.address or i.address >= target for i in kernel.instructions)


def test_a_loop_without_trip_count_is_an_error_naming_its_line(triton_dir):
    functions, _ = _load(triton_dir, "loop")
    with pytest.raises(sass.UnknownLoop, match=f"{THIS_FILE.name}:{LOOP_LINE}"):
        sass.walk(functions, branches={STORE_LINE: Decision.BOTH})


def test_an_undecided_branch_is_an_error_naming_its_address_and_line(triton_dir):
    functions, meta = _load(triton_dir, "loop")
    exit_ = next(i for i in functions[meta["name"]].instructions if i.base == "EXIT" and i.predicated)
    with pytest.raises(sass.UndecidedBranch, match=rf"{exit_.address:#06x}.*{THIS_FILE.name}:{STORE_LINE}"):
        sass.walk(functions, trips={LOOP_LINE: 2})
    # a decider that does not apply to it leaves it undecided too
    with pytest.raises(sass.UndecidedBranch):
        sass.walk(functions, trips={LOOP_LINE: 2}, default=runs(IF_LINE))


def test_if_else_arms_count_one_at_a_time(triton_dir):
    functions, meta = _load(triton_dir, "branch")
    kernel = functions[meta["name"]]
    (branch,) = sass.ControlFlowGraph(kernel).branches.values()
    assert branch.kind == "if-else"
    assert branch.instruction.locations[0].line == IF_LINE
    static = len(kernel.instructions)
    then = sass.walk(functions, branches={IF_LINE: runs(THEN_LINE)})
    else_ = sass.walk(functions, branches={IF_LINE: runs(ELSE_LINE)})
    both = sass.walk(functions, branches={IF_LINE: Decision.BOTH})
    assert (_executed(then, "MUFU.EX2"), _executed(then, "MUFU.SQRT")) == (1, 0)
    assert (_executed(else_, "MUFU.EX2"), _executed(else_, "MUFU.SQRT")) == (0, 1)
    assert both.warp_instructions == static  # no loop: a warp that runs both arms runs every instruction once

    def arm_size(line):
        (taken,) = [t for t in (True, False) if sass.Location(str(THIS_FILE), line) in branch.region_locations(t)]
        return sum(len(b.instructions) for b in branch.region(taken))

    assert then.warp_instructions == static - arm_size(ELSE_LINE)
    assert else_.warp_instructions == static - arm_size(THEN_LINE)
    address = branch.instruction.address
    assert {then.decision_at(address), else_.decision_at(address)} == {Decision.TAKEN, Decision.NOT_TAKEN}
    assert sass.walk(functions, default=skips(THEN_LINE)).warp_instructions == else_.warp_instructions


@pytest.mark.parametrize("listing", [BOTTOM_EXIT_LOOP, WHILE_LOOP], ids=["bottom-exit", "while"])
def test_every_loop_shape_runs_its_body_trips_times(listing):
    functions = sass.parse_sass(listing)
    for trips in (0, 1, 2, 5):
        result = sass.walk(functions, trips={3: trips})
        assert _executed(result, "FADD") == trips
        # while: the test runs once more than the body; bottom exit: the guard's test, then one per body
        assert _executed(result, "ISETP.GE.AND") == trips + 1


def test_straight_line_kernel_runs_every_instruction_once(triton_dir):
    functions, meta = _load(triton_dir, "philox")
    kernel = functions[meta["name"]]
    assert sass.ControlFlowGraph(kernel).loops == []
    assert sass.walk(functions).warp_instructions == len(kernel.instructions)


# ----------------------------------------------------------------------------------------------
# Classification


def test_philox_instructions_of_tl_philox(triton_dir):
    functions, meta = _load(triton_dir, "philox")
    instructions = functions[meta["name"]].instructions
    classes = {i: sass.classify(i) for i in instructions}
    philox = [i for i, cls in classes.items() if cls == "philox"]
    # 10 rounds, each with two high words of 32x32 multiplies (an IMAD.HI, or an IMAD.WIDE that
    # forms both halves: Triton 3.6 takes one) and two three-way xors (the first round's partly folded)
    assert sum(i.opcode in ("IMAD.HI.U32", "IMAD.WIDE.U32") for i in philox) == 20
    assert sum(i.base == "LOP3" for i in philox) >= 18
    assert all(any(loc.file.endswith("triton/language/random.py") for loc in i.locations) for i in philox)
    # the key schedule is the same for every lane: ptxas moves it to the uniform datapath
    key_schedule = [i for i in instructions if i.opcode == "UIADD3"]
    assert len(key_schedule) >= 18 and {classes[i] for i in key_schedule} == {"uniform"}
    store_address = [i for i in instructions if i.locations and i.locations[0].file == str(THIS_FILE)]
    assert store_address and all(classes[i] != "philox" for i in store_address)


@pytest.mark.parametrize(
    "opcode, cls",
    [("MUFU.EX2", "mufu"), ("SHFL.BFLY", "sync"), ("FFMA", "fp32"), ("HFMA2.MMA", "fp32"), ("DFMA", "fp64"),
     ("IMAD.WIDE.U32", "int"), ("LOP3.LUT", "int"), ("ISETP.GE.AND", "int"), ("I2FP.F32.U32", "convert"),
     ("F2I.FTZ.U32.TRUNC.NTZ", "convert"), ("LDG.E", "memory"), ("STS", "memory"), ("LDC.64", "memory"),
     ("BAR.SYNC.DEFER_BLOCKING", "sync"), ("BSSY", "sync"), ("ULDC.64", "uniform"), ("UIADD3", "uniform"),
     ("UTMALDG.2D", "memory"), ("S2R", "other"), ("MOV", "other"), ("BRA", "other"), ("EXIT", "other")],
)  # fmt: skip
def test_opcode_classes(opcode, cls):
    assert sass.classify(sass.Instruction("k", 0, None, opcode, "", (), None), philox=()) == cls


def test_unknown_opcode_is_an_error():
    with pytest.raises(ValueError, match="XYZZY"):
        sass.classify(sass.Instruction("k", 0, None, "XYZZY.FOO", "", (), None), philox=())


def test_known_opcodes_in_real_code(triton_dir):
    functions, meta = _load(triton_dir, "loop")
    classes = {i.opcode: sass.classify(i) for i in functions[meta["name"]].instructions}
    assert classes["MUFU.EX2"] == "mufu"
    assert classes["SHFL.BFLY"] == "sync"
    assert classes["BAR.SYNC.DEFER_BLOCKING"] == "sync"
    result = sass.walk(functions, trips={LOOP_LINE: 3}, branches={STORE_LINE: Decision.BOTH})
    by_class = result.by_class()
    assert list(by_class) == list(sass.CLASSES)
    assert sum(by_class.values()) == result.warp_instructions  # every instruction in exactly one class


# ----------------------------------------------------------------------------------------------
# CUDA C++


def test_cuda_loop_divergent_branch_and_shuffles(cuda_kernel):
    path, _, functions = cuda_kernel
    loop_line, then_line = line_of(path, "// row loop"), line_of(path, "// then arm")
    store_line = line_of(path, "// lane 0 stores")
    cfg = sass.ControlFlowGraph(functions["_Z8row_sumsPKfPfii"])
    (loop,) = cfg.loops

    def run(trips, decider):
        return sass.walk(functions, trips={(path.name, loop_line): trips}, branches={store_line: Decision.BOTH},
                         default=decider)  # fmt: skip

    both = [run(t, sass.both_sides) for t in (2, 4)]
    assert both[1].warp_instructions - both[0].warp_instructions == 2 * loop.size
    positive, negative = run(4, runs(then_line)), run(4, skips(then_line))
    assert (_executed(positive, "MUFU.EX2"), _executed(negative, "MUFU.EX2")) == (4, 0)
    (divergent,) = [b for b in cfg.branches.values() if b.block in loop.blocks]
    then_side = negative.decision_at(divergent.instruction.address) is Decision.NOT_TAKEN
    then_arm = sum(len(b.instructions) for b in divergent.region(then_side))
    assert negative.warp_instructions == both[1].warp_instructions - 4 * then_arm
    shuffles = {i: n for i, n in both[1].executions.items() if i.base == "SHFL"}
    assert len(shuffles) == 5 and set(shuffles.values()) == {1}
    assert {sass.classify(i, philox=()) for i in shuffles} == {"sync"}


def test_cuda_philox_by_caller_given_function(cuda_kernel):
    path, _, functions = cuda_kernel
    mix = sass.cpp_function_lines(path, "mix")
    assert (mix.first, mix.last) == (line_of(path, "uint32_t mix(uint32_t c) {"), line_of(path, "return mulhi(c") + 1)
    instructions = functions["_Z8row_sumsPKfPfii"].instructions
    mulhi = next(i for i in instructions if i.opcode == "IMAD.HI.U32")
    assert mulhi.locations[0].line == line_of(path, "uint32_t mulhi(")  # innermost: the helper mix calls
    assert sass.classify(mulhi, philox=[mix]) == "philox"
    assert sass.classify(mulhi, philox=()) == "int"
    address = next(i for i in instructions if i.opcode == "IMAD.WIDE.U32")
    assert sass.classify(address, philox=[mix]) == "int"


# ----------------------------------------------------------------------------------------------
# Registers, occupancy, model


def test_resource_usage(triton_dir, cuda_kernel):
    meta = json.loads((triton_dir / "loop.json").read_text())
    usage = sass.resource_usage((triton_dir / "loop.cubin").read_bytes())[meta["name"]]
    assert 0 < usage.registers <= 255 and usage.spill_bytes == 0
    assert usage.own_shared == 0  # Triton's reduction buffer is dynamic shared memory
    (cuda_usage,) = sass.resource_usage(cuda_kernel[1]).values()
    assert cuda_usage.spill_bytes == 0 and cuda_usage.own_shared == 0


@pytest.mark.parametrize(
    "registers, threads, shared, blocks, limiter",
    [
        # 96 x 32 = 3072 registers per warp; 16384 per SMSP // 3072 = 5 warps x 4 SMSPs = 20 warps: 5 blocks of 4
        (96, 128, 512, 5, "registers"),
        # 16 x 32 = 512 per warp: 128 warps' worth; 64 warps per SM at most, 32 blocks at most
        (16, 32, 0, 32, "blocks"),
        # 48 KiB + the 1 KiB reserve = 50176 B; 233472 // 50176 = 4
        (32, 128, 48 * 1024, 4, "shared"),
        # 192 x 32 = 6144 per warp: 2 per SMSP, 8 per SM (65536 // 6144 = 10 if the SMSPs were pooled)
        (192, 32, 0, 8, "registers"),
        # 255 x 32 = 8160, rounded to 8192 per warp, x 32 warps > 65536: the block does not fit
        (255, 1024, 0, 0, "registers"),
        # 40 x 32 = 1280 per warp: 12 per SMSP, 48 warps, 3 per block: 16; warps alone: 64 // 3 = 21;
        # shared: 100 + 1024 rounded up to 1152: 202
        (40, 96, 100, 16, "registers"),
    ],
)
def test_blocks_per_sm(registers, threads, shared, blocks, limiter):
    occupancy = sass.blocks_per_sm(registers, threads, shared)
    assert (occupancy.blocks, occupancy.limiter) == (blocks, limiter)


def test_blocks_per_sm_by_warps():
    occupancy = sass.blocks_per_sm(32, 512)  # 1024 registers per warp: 64 warps by registers, 64 by warps
    assert (occupancy.by_registers, occupancy.by_warps, occupancy.blocks) == (4, 4, 4)


def test_throughput_model():
    assert sass.H100_ISSUE_RATE == pytest.approx(29.65e12, rel=1e-3)
    issue = sass.predict(thread_instructions=29.65e9, bytes_moved=1e6, efficiency=0.5)
    assert issue.ms == pytest.approx(2.0, rel=1e-3) and issue.bound == "issue"
    memory = sass.predict(thread_instructions=1e6, bytes_moved=6e9, efficiency=0.5)
    assert memory.ms == pytest.approx(2.0) and memory.bound == "memory"
    with pytest.raises(ValueError):
        sass.predict(1, 1, 0.0)
    assert [sass.calibrated_efficiency(c) for c in (10, 19, 150, 1000)] == [0.56, 0.56, 0.52, 0.52]


def test_compile_triton_refuses_an_interpreted_kernel():
    if type(_loop_kernel).__name__ != "InterpretedFunction":
        pytest.skip("this session compiles kernels for real")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        sass.compile_triton(*TRITON_KERNELS["loop"])


if __name__ == "__main__":
    _compile_triton_kernels(Path(sys.argv[1]))
