"""The configuration sweep (benchmarks/sweep.py): its candidates compute the right loss, its own
agreement check rejects a wrong gradient, its measured loop runs end to end on the CPU (timer and
device stood in for), and its static mode compiles every candidate of a case for sm_90."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from grid import DEVICE, HAS_CUDA, Case, check_matches_reference, make_inputs

from benchmarks import common, sass, static_report, sweep
from blv_kernels.backends import triton_kernel as tk

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1", reason="Triton runs on a GPU or its interpreter"
)


@pytest.mark.parametrize("positions_contiguous", [True, False])
@pytest.mark.parametrize("num_classes", [7, 19, 25, 150, 1000])
def test_candidates_start_with_kernel_config_and_vary_it_once_each(num_classes, positions_contiguous):
    chosen = tk.kernel_config(num_classes, positions_contiguous)
    found = sweep.candidates(num_classes, positions_contiguous)
    assert found[0] == chosen and len(set(found)) == len(found) > 1
    groups = math.ceil(num_classes / 4)
    for config in found:
        threads = 32 * config.num_warps // config.block_p  # holding one position's row
        if config.chunk_groups:  # two sweeps, one position a thread
            assert threads == 1 and config.main_groups == 0
        elif threads == 1:  # one position a thread: its blocks
            assert groups <= tk.ONE_THREAD_MAX_GROUPS and config.main_groups == chosen.main_groups
            assert config.tail_groups == chosen.tail_groups
        else:  # the row spread over warps (one position a lane) or lanes: none smaller than the threads
            assert (config.main_groups, config.tail_groups) == tk.class_blocks(groups, threads)
            assert config.main_groups >= threads
            assert config.block_p == 32 and groups > tk.ONE_THREAD_MAX_GROUPS or not positions_contiguous
    lanes = {32 * c.num_warps // c.block_p for c in found if c.block_p < 32 and not c.chunk_groups}
    assert bool(lanes) == (not positions_contiguous)  # contiguous classes: rows over lanes, whatever C
    # above 24 classes every blocking is a candidate while the row fits a program
    if groups > tk.ONE_THREAD_MAX_GROUPS:
        warps = {c.num_warps for c in found if c.block_p == 32 and not c.chunk_groups}
        assert any(c.chunk_groups for c in found)
        assert bool(warps) == (groups <= 2 * tk.ONE_THREAD_MAX_GROUPS * tk.ROW_WARPS[-1])  # up to 12 groups a thread
    assert len({sweep.describe(c) for c in found}) == len(found)


def _distinct_blockings(num_classes: int, positions_contiguous: bool) -> list[tk.KernelConfig]:
    """The candidates that differ in what the kernel computes (warps and register caps change only the code)."""
    seen = {}
    for config in sweep.candidates(num_classes, positions_contiguous):
        seen.setdefault((config.block_p, config.main_groups, config.tail_groups, config.chunk_groups), config)
    return list(seen.values())


@pytest.mark.parametrize(
    "case", [Case((2, 19, 6, 11)).param(), Case((2, 19, 5, 7), layout="channels_last").param(),
             Case((1, 150, 3, 5), reduction="none", weight=True).param(),
             Case((5, 67), dtype=torch.bfloat16, reduction="sum").param()],
)  # fmt: skip
def test_every_candidate_matches_the_reference(case, rng, poisoned, monkeypatch):
    # the sweep must time only kernels that compute the loss: each blocking, through the public entry
    inputs = make_inputs(case, rng)
    view = tk.Addressed.of(SimpleNamespace(logits=inputs.logits, target=inputs.target, position_weight=None),
                           compute_grad=True)  # fmt: skip
    for config in _distinct_blockings(case.shape[1], view.positions_contiguous):
        monkeypatch.setattr(
            tk, "kernel_config", lambda num_classes, positions_contiguous=True, pressure=0, config=config: config
        )
        check_matches_reference("triton", case, rng)


def test_agreement_check_rejects_a_wrong_gradient(rng):
    for dtype in (torch.float32, torch.bfloat16):
        grad = (torch.randn(4, 19, 8, generator=rng) * 1e-7).to(dtype)  # a mean over many positions: tiny values
        assert sweep.agrees(grad.clone(), grad)
        wrong = grad.clone()
        wrong[1, 3, 5] += 0.05 * grad.abs().max()  # 5% of the largest element: far beyond reordered sums
        assert not sweep.agrees(wrong, grad)


@pytest.mark.skipif(HAS_CUDA, reason="the CPU stands in for the card here")
def test_measured_sweep_runs_end_to_end_on_the_cpu(tmp_path, monkeypatch, capsys):
    # the GPU's timer and CUDA graph replaced by the host loop: every row, the JSON and the summary
    monkeypatch.setattr(
        sweep, "graph_ms", lambda fn: common.host_loop(fn, reps=2, warmup=0, device=torch.device("cpu"))
    )
    cases = [static_report.Case((2, 19, 4, 6), torch.float32, "nchw"),
             static_report.Case((16, 30), torch.bfloat16, "rows")]  # fmt: skip
    data = {"copy_bandwidth": {"gbps": 10.0}, "results": []}
    assert sweep.measured_rows(cases, torch.device(DEVICE), float("inf"), data, tmp_path)
    written = json.loads((tmp_path / "sweep.json").read_text())
    assert written["results"] == data["results"]
    for case in cases:
        rows = [r for r in data["results"] if r["case"] == case.name]
        triton = [r for r in rows if r["backend"] == "triton"]
        assert len(triton) == len(sweep.candidates(case.num_classes, case.positions_contiguous)) and all(
            r["status"] == "ok" for r in triton
        )
        assert sum(r["chosen"] for r in triton) == 1
        (cuda,) = [r for r in rows if r["backend"] == "cuda"]
        assert cuda["status"] == "skipped" and "cuda" in cuda["reason"]
    table = sweep.summary(data["results"])
    assert all(case.name in table for case in cases)
    assert "16x30-bf16-rows" in capsys.readouterr().out  # a line per row as it finishes


def test_budget_skips_what_is_left_and_a_run_that_timed_nothing_fails(tmp_path, monkeypatch):
    def never(*args):
        raise AssertionError("a case's inputs were built (and its reference compiled) with no budget left")

    monkeypatch.setattr(sweep, "device_problem", never)
    data = {"copy_bandwidth": {"gbps": 10.0}, "results": []}
    case = static_report.Case((2, 7, 3, 3), torch.float32, "nchw")
    assert not sweep.measured_rows([case], torch.device(DEVICE), -1.0, data, tmp_path)
    triton = [r for r in data["results"] if r["backend"] == "triton"]
    assert len(triton) == len(sweep.candidates(7))
    assert all(r["status"] == "skipped" and "budget" in r["reason"] for r in triton)
    # every row says which candidate it is, whatever became of it
    assert [r["description"] for r in triton] == [sweep.describe(c) for c in sweep.candidates(7)]
    assert sum(r["chosen"] for r in triton) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "needs a CUDA device"),
        (["--static", "--cases", "nope"], "--cases: unknown ['nope']"),
        (["--static", "--cases", ""], "--cases: unknown ['']"),  # as loss's --shapes "": not every case
        (["--budget-s", "nan"], "--budget-s: must be a finite number of seconds >= 0, got nan"),
    ],
)
def test_cli_errors_are_one_line(argv, message):
    env = dict(os.environ)
    if not argv:
        env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-m", "benchmarks.sweep", *argv], cwd=REPO_ROOT, capture_output=True,
                            text=True, env=env, timeout=120)  # fmt: skip
    assert result.returncode == 2 and result.stderr.startswith("python -m benchmarks.sweep: error: ")
    assert result.stderr.count("\n") == 1 and message in result.stderr


def test_unusable_out_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    def work(*args):
        raise AssertionError("the sweep started with an --out it cannot write to")

    monkeypatch.setattr(sweep, "static_rows", work)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # --static refuses the interpreter first
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    assert sweep.main(["--static", "--cases", next(iter(sweep.CASES)), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"python -m benchmarks.sweep: error: --out {out}: exists and is not a directory\n"
    assert out.read_text() == "keep me"


@pytest.mark.skipif(
    sass.find_tool("nvdisasm") is None or sass.find_tool("cuobjdump") is None,
    reason="Triton's bundled nvdisasm/cuobjdump are needed",
)
def test_static_sweep_compiles_every_candidate(tmp_path):
    case = "8x19x512x1024-bf16-nchw"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "benchmarks.sweep", "--static", "--cases", case, "--out",
                             str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=1800)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "sweep_static.json").read_text())["results"]
    assert [r["config"] for r in rows] == [c._asdict() for c in sweep.candidates(19)]
    (chosen,) = [r for r in rows if r["chosen"]]
    assert chosen["spill_bytes"] == 0 and chosen["blocks_per_sm"] >= 4
    assert all(r["per_element"] > 0 and r["predicted_ms"] > 0 for r in rows)


def test_a_failing_candidate_is_named_and_fails_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "graph_ms", lambda fn: [1.0, 1.0, 1.0])
    measure = sweep.measure
    broken = sweep.candidates(7)[1]

    def measure_or_fail(backend, case, problem, grad_output, config=None, expected=None):
        if config == broken:
            raise RuntimeError("launch failed\nsecond line")
        return measure(backend, case, problem, grad_output, config, expected)

    monkeypatch.setattr(sweep, "measure", measure_or_fail)
    data = {"copy_bandwidth": {"gbps": 10.0}, "results": []}
    case = static_report.Case((2, 7, 3, 3), torch.float32, "nchw")
    assert not sweep.measured_rows([case], torch.device(DEVICE), float("inf"), data, tmp_path)
    (failed,) = [r for r in data["results"] if r["status"] == "failed"]
    assert failed["description"] == sweep.describe(broken) and failed["reason"] == "RuntimeError: launch failed"
