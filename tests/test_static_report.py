"""The compiled code of the Triton backend, measured without a GPU (benchmarks/static_report.py):
the issue's instruction budget, registers, spills and occupancy are deterministic properties of
the sm_90 SASS, so they are gated here like correctness.

Triton compiles for a GPU target without a GPU, but not under the interpreter the other tests
run it with, so the report runs in a process of its own without TRITON_INTERPRET.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import sass, static_report
from blv_kernels.backends import triton_kernel as tk

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(
        sass.find_tool("nvdisasm") is None or sass.find_tool("cuobjdump") is None,
        reason="Triton's bundled nvdisasm/cuobjdump are needed",
    ),  # fmt: skip
    pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the card measures; this runs where none is"),
]


def _report(*args: str):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "benchmarks.static_report", "--json", *args], cwd=REPO_ROOT,
                            capture_output=True, text=True, env=env, timeout=1800)  # fmt: skip
    assert result.returncode in (0, 1), result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def step_reports():
    return {r["case"]: r for r in _report()}


def test_every_benchmark_case_is_reported(step_reports):
    assert set(step_reports) == set(static_report.CASES)
    for report in step_reports.values():
        assert [k["kernel"] for k in report["kernels"]] == ["_label_kernel", "_blv_loss_kernel", "_scale_kernel"]
        assert report["total_per_element"] == pytest.approx(sum(report["per_element"].values()))
        assert report["predicted_ms"] > 0 and report["bound"] in ("issue", "memory", "access")


def test_instruction_budget(step_reports):
    # the budget of the kernel-budget issue: forward + backward, thread-instructions per logical
    # element, sigma 6: <= 75 at C = 19 and <= 100 at C = 150 for NCHW, 1.25x that for
    # channels_last and (N, C) rows, fp32 and bf16 alike
    for report in step_reports.values():
        num_classes = report["shape"][1]
        budget = static_report.BUDGET[min(static_report.BUDGET, key=lambda c: abs(c - num_classes))]
        if report["layout"] != "nchw":
            budget *= 1.25
        assert report["total_per_element"] <= budget, (report["case"], report["total_per_element"], budget)
        assert report["per_element"]["philox"] > 0  # the Philox instructions are found and classed


def test_loss_pass_exchanges_no_logits_between_threads(step_reports):
    # Up to 24 classes a thread holds its position's row in registers (the divisibility hint on
    # the offsets): no layout conversion through shared memory, no barrier. Triton 3.6 dropped the
    # hint where it sat on a helper's result and converted every class chunk's logits through
    # shared memory (9.7 sync instructions per element at C = 150, 120 in all); with strided
    # positions it spread a tile's threads over the classes unless the tile went through memory
    # flat (1.8 at C = 19 channels_last, 5.2-5.6 at C = 150). Above 24 classes a program's warps
    # (NCHW) or a warp's lanes (contiguous classes) share the rows, and only the class reductions
    # cross them (the max, the sum and z_t of the main and the tail block: 2.2-2.6 per element at
    # C = 150 NCHW, through shared memory; shuffles over lanes, against 4 allowed).
    for report in step_reports.values():
        loss = next(k for k in report["kernels"] if k["kernel"] == "_blv_loss_kernel")
        one_thread = report["shape"][1] <= 4 * tk.ONE_THREAD_MAX_GROUPS
        assert loss["per_element"]["sync"] < (1.0 if one_thread else 4.0), (report["case"], loss["per_element"])


def test_registers_spills_and_occupancy(step_reports):
    for report in step_reports.values():
        for kernel in report["kernels"]:
            assert kernel["spill_bytes"] == 0, (report["case"], kernel)
            assert kernel["registers"] <= 128, (report["case"], kernel)
            assert kernel["warps_per_sm"] >= 16, (report["case"], kernel)


def test_backward_with_grad_output_one_moves_nothing(step_reports):
    # loss.backward() of a mean: the scaling kernel reads the scalar grad_output and returns,
    # without a load or store of the gradient
    for report in step_reports.values():
        scale = report["kernels"][2]
        assert not any("grad_ptr + o" in line for line in scale["memory_lines"]), scale
        assert scale["total"] < 0.5, (report["case"], scale)


def test_every_configuration_compiles_without_spills():
    rows = _report("--all-configs")
    chosen = {(r["config"]["main_groups"], r["config"]["tail_groups"], r["config"]["chunk_groups"],
               r["partial_chunk"]) for r in rows}  # fmt: skip
    assert (0, 0, 2, True) in chosen and (0, 0, 2, False) in chosen and (4, 2, 0, False) in chosen
    assert (0, 0, 32, True) in chosen and (0, 0, 32, False) in chosen  # contiguous classes swept twice
    assert [r for r in rows if r["spill_bytes"] or r["registers"] > 128] == []


def test_every_option_set_compiles_without_spills_where_a_row_is_in_one_thread():
    # the register caps a row in one thread takes (kernel_config's pressure) were set by hand:
    # each option set, up to ONE_THREAD_MAX_GROUPS groups (wider rows: RESULTS.md, run by hand)
    rows = _report("--all-configs", "--options", "every", "--max-classes", str(4 * tk.ONE_THREAD_MAX_GROUPS))
    assert {"+".join(r["options"]) for r in rows} == {"+".join(o) for o in static_report.OPTION_SETS.values()}
    assert {r["config"]["maxnreg"] for r in rows} == {96, 128, None}
    assert [r for r in rows if r["spill_bytes"]] == []


def _loss_launch(case, config=None):
    problem, scalar = static_report.meta_problem(case)
    return tk.loss_launch(problem, tk.Addressed.of(problem, compute_grad=True), scalar, config)


def test_line_accesses_counts_the_lines_of_each_warp_access():
    # by hand: NCHW, a warp's access is 32 consecutive positions of one class, one line of 128 B in
    # fp32, loaded once and stored once: 2 / 32 a element (class 19 of the padded tile is masked)
    assert (
        static_report.line_accesses(_loss_launch(static_report.Case((2, 19, 64, 64), torch.float32, "nchw"))) == 2 / 32
    )
    # the card's slow case: rows swept twice, one a thread, a warp's access one class of 32 rows of
    # 4000 B, 32 lines: loaded twice and stored once, 3 lines a element (the model's calibration)
    two_sweeps = tk.KernelConfig(128, 4, 0, 0, 2, 128)
    assert (
        static_report.line_accesses(_loss_launch(static_report.Case((4096, 1000), torch.float32, "rows"), two_sweeps))
        == 3.0
    )
    # across 64 lanes: consecutive groups, a group's class k 16 B apart: 32 lanes span 512 B, 4 or 5
    # lines (a row starts 4000 B after the last, 32 B into a line), loaded once and stored once
    lines = static_report.line_accesses(_loss_launch(static_report.Case((4096, 1000), torch.float32, "rows")))
    assert 2 * 4 / 32 < lines < 2 * 5 / 32


def test_contiguous_classes_are_read_a_few_rows_a_warp_access(step_reports):
    # above 24 classes a row spreads over lanes: a warp's access reads a few rows (at most 0.5 lines
    # a element; 32 rows, 2-3 lines, before); NCHW reads 32 consecutive positions (1/16). Up to 24
    # classes channels_last still gives each thread a row (0.6-1.2 lines: the model's access bound).
    for report in step_reports.values():
        if report["layout"] == "nchw":
            assert report["lines_per_element"] == pytest.approx(2 / 32, rel=0.01), report["case"]
        elif report["shape"][1] > 4 * tk.ONE_THREAD_MAX_GROUPS:
            assert report["lines_per_element"] < 0.5 and report["bound"] == "issue", report["case"]


def _no_work(*args, **kwargs):
    raise AssertionError("the report started on arguments it should have refused")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cases", ""], "--cases: unknown ['']"),  # read as every case, where loss's --shapes "" is refused
        (["--options", "every"], "--options: only with --all-configs"),  # ignored by the case report
        (["--max-classes", "64"], "--max-classes: only with --all-configs"),
        (["--all-configs", "--cases", next(iter(static_report.CASES))], "--cases: not with --all-configs"),
        (["--all-configs", "--max-classes", "0"], "argument --max-classes: must be an integer >= 1, got 0"),
    ],
)
def test_arguments_the_report_would_ignore_are_refused_in_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(static_report, "case_report", _no_work)
    monkeypatch.setattr(static_report, "config_rows", _no_work)
    assert static_report.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"python -m benchmarks.static_report: error: {message}")
