"""The benchmark code is code: its entry points run on the CPU at tiny sizes, and their JSON says
everything it claims, every provider included (skipped ones with a reason, never dropped)."""

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import blv_kernels
from benchmarks import common, host, loss, plots, sass, summary, training

REPO_ROOT = Path(__file__).resolve().parents[1]

# Spelled out here, not read from the module: a provider or field the code stops emitting must fail.
PROVIDERS = ("cross_entropy", "reference", "reference_compile", "released", "triton", "cuda", "cpu")
LOSS_FIELDS = {
    "provider", "case", "shape", "dtype", "layout", "pass", "status", "reason", "timer", "ms", "ms_p20", "ms_p80", "host_ms",
    "bytes", "gbps", "pct_copy_bandwidth", "floor_ms", "peak_extra_bytes", "peak_extra_vs_logits",
    "speedup_vs_cross_entropy",
}  # fmt: skip
META_FIELDS = {"device", "torch", "triton", "commit", "date", "note"}
TRAINING_LOSSES = ("cross_entropy", "blv_reference", "blv_triton", "blv_cuda", "blv_cpu")
TRAINING_FIELDS = {"precision", "loss", "status", "reason", "ms_per_iter", "ms_p20", "ms_p80", "overhead_pct"}
# one NCHW, one channels_last and one (N, C) case, in two dtypes; aot_eager: compiling with
# inductor on 2 cores would take a minute, and what is tested here is the harness
LOSS_ARGS = ["--device", "cpu", "--size", "tiny", "--shapes", "cityscapes-n2,ade20k-cl,classification",
             "--dtypes", "fp32,bf16", "--compile-backend", "aot_eager", "--reps", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def loss_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("loss")
    assert loss.main([*LOSS_ARGS, "--out", str(out)]) == 0
    return out, json.loads((out / "loss.json").read_text())


def test_loss_json_has_every_provider_case_and_field(loss_run):
    _, data = loss_run
    assert META_FIELDS <= set(data["meta"])
    assert data["meta"]["device"] and data["meta"]["date"]
    assert "scaled down" in data["meta"]["note"]
    assert data["copy_bandwidth"]["gbps"] > 0
    assert tuple(data["providers"]) == PROVIDERS
    cases = {(c["case"], c["dtype"]) for c in data["cases"]}
    assert cases == {(s, d) for s in ("cityscapes-n2", "ade20k-cl", "classification") for d in ("fp32", "bf16")}
    rows = {(r["provider"], r["case"], r["dtype"], r["pass"]): r for r in data["results"]}
    assert len(rows) == len(data["results"]) == len(PROVIDERS) * len(cases) * 2
    for provider in PROVIDERS:
        for case, dtype in cases:
            for pass_ in ("fwd", "fwd_bwd"):
                row = rows[provider, case, dtype, pass_]
                assert set(row) == LOSS_FIELDS
                assert row["bytes"] > 0 and row["floor_ms"] > 0
    layouts = {c["case"]: c["layout"] for c in data["cases"]}
    assert layouts["ade20k-cl"] == "channels_last" and layouts["cityscapes-n2"] == "contiguous"


@pytest.mark.parametrize("provider", ["cross_entropy", "reference", "reference_compile", "released", "cpu"])
def test_cpu_providers_are_timed(loss_run, provider):
    _, data = loss_run
    if provider == "cpu" and blv_kernels.backends.BACKENDS["cpu"].why_not("cpu", torch.float32) is not None:
        pytest.skip("the CPU kernel cannot be built here (no C++ compiler)")
    for row in (r for r in data["results"] if r["provider"] == provider):
        assert row["status"] == "ok", row["reason"]
        assert 0 < row["ms_p20"] <= row["ms"] <= row["ms_p80"]
        assert row["gbps"] > 0 and row["pct_copy_bandwidth"] > 0 and row["speedup_vs_cross_entropy"] > 0
        assert row["peak_extra_bytes"] is None and row["host_ms"] is None  # GPU-only measurements
    fwd_bwd_bytes = {r["case"] + r["dtype"]: r["bytes"] for r in data["results"] if r["pass"] == "fwd_bwd"}
    fwd_bytes = {r["case"] + r["dtype"]: r["bytes"] for r in data["results"] if r["pass"] == "fwd"}
    assert all(fwd_bwd_bytes[k] > fwd_bytes[k] for k in fwd_bytes)  # the gradient is written


def test_slow_providers_run_after_every_case_of_the_fast_ones(loss_run):
    # so that a budget cut short loses the reference's rows, not the fused kernels'
    _, data = loss_run
    order = [r["provider"] for r in data["results"]]
    last_fast = max(i for i, p in enumerate(order) if p in ("cross_entropy", "triton", "cuda", "cpu"))
    first_slow = min(i for i, p in enumerate(order) if p in ("reference", "released"))
    assert last_fast < first_slow < order.index("reference_compile")


def test_gpu_providers_are_skipped_with_a_reason(loss_run):
    _, data = loss_run
    for provider in ("triton", "cuda"):
        assert not data["providers"][provider]["available"]
        assert data["providers"][provider]["reason"]
        for row in (r for r in data["results"] if r["provider"] == provider):
            assert row["status"] == "skipped" and row["reason"] and row["ms"] is None
    assert "Triton interpreter" in data["providers"]["triton"]["reason"]


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header.startswith(b"\x89PNG")
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")  # IHDR width, height


def test_loss_table_plots_and_summary(loss_run, capsys):
    out, data = loss_run
    pytest.importorskip("matplotlib")
    for name in ("loss_time.png", "loss_bandwidth.png"):
        width, height = _png_size(out / name)
        assert 0.5 <= width / height <= 2.5 and width <= 1500  # readable on a screen, not a strip
    notes = plots.not_timed_notes(data)  # written under the plots
    assert [n.split(":")[0] for n in notes] == [data["providers"][p]["label"] for p in ("triton", "cuda")]
    assert all("not timed (" in n for n in notes)
    assert summary.main([str(out)]) == 0
    printed = capsys.readouterr().out
    for provider in PROVIDERS:
        assert data["providers"][provider]["label"] in printed
    assert "classification-bf16" in printed


def test_plots_take_a_dtype_with_nothing_timed(loss_run, tmp_path):
    # as on the GPU check's budget: every case of one dtype skipped (the log scale had no range)
    pytest.importorskip("matplotlib")
    _, data = loss_run
    dtype = data["cases"][-1]["dtype"]
    results = [{**r, "status": "skipped", "ms": None} if r["dtype"] == dtype else r for r in data["results"]]
    assert plots.plot_loss({**data, "results": results}, tmp_path).startswith("wrote")
    for name in ("loss_time.png", "loss_bandwidth.png"):
        assert _png_size(tmp_path / name)[0] > 0


def test_host_ms_times_back_to_back_calls_without_waiting_for_the_device(monkeypatch):
    # on a GPU: synchronized around the calls only, each call's gradient cleared first
    syncs, grads_seen = [], []
    monkeypatch.setattr(common, "synchronize", lambda device: syncs.append(len(grads_seen)))
    x = torch.zeros(3, requires_grad=True)

    def call():
        grads_seen.append(x.grad)
        x.grad = torch.ones(3)
        time.sleep(0.002)

    ms = common.host_ms(call, device=torch.device("cuda"), grad_to_none=[x], calls=5)
    assert syncs == [0, 5] and grads_seen == [None] * 5 and 2 <= ms < 50
    assert common.host_ms(call, device=torch.device("cpu")) is None


def test_host_ms_calls_fill_a_bounded_device_time():
    # 20 calls of a fused kernel, one of the 400 ms eager reference (the GPU check's budget)
    assert [loss.host_calls(ms) for ms in (0.3, 2.5, 10.0, 400.0)] == [20, 20, 5, 1]


def test_missing_backend_is_reported_as_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "BACKENDS", {"reference": blv_kernels.backends.BACKENDS["reference"]})
    argv = ["--device", "cpu", "--size", "tiny", "--shapes", "cityscapes-n2", "--dtypes", "fp32", "--reps", "1",
            "--providers", "cross_entropy,triton,cuda", "--no-plots", "--out", str(tmp_path)]  # fmt: skip
    assert loss.main(argv) == 0
    data = json.loads((tmp_path / "loss.json").read_text())
    assert tuple(data["providers"]) == PROVIDERS
    for provider in ("triton", "cuda"):
        assert "not in this build" in data["providers"][provider]["reason"]
    assert data["providers"]["reference"]["reason"] == "not selected (--providers)"
    statuses = {(r["provider"], r["pass"]): r["status"] for r in data["results"]}
    assert len(statuses) == len(PROVIDERS) * 2
    assert statuses["cross_entropy", "fwd_bwd"] == "ok"
    assert all(s == "skipped" for (p, _), s in statuses.items() if p != "cross_entropy")


def test_case_grids_cover_the_issue():
    full = {s: spec.full for s, spec in loss.SHAPES.items()}
    assert {(2, 19, 512, 1024), (8, 19, 512, 1024), (16, 150, 512, 512), (8, 171, 512, 512), (65536, 1000)} <= set(
        full.values()
    )
    assert any(spec.channels_last for spec in loss.SHAPES.values())
    assert {(2, 19, 256, 256), (8, 1000)} <= {spec.small for spec in loss.SHAPES.values()}  # the CPU kernel's baselines

    def cases(argv, device):
        args = loss.parse_args(argv)
        args.profile = loss.choose_profile(args, torch.device(device))
        return loss.select_cases(args)

    assert len(cases([], "cuda")) == len(cases(["--full"], "cpu")) == len(loss.SHAPES) * 3
    quick = cases(["--quick"], "cuda")
    assert quick[:4] == list(loss.QUICK_COMPILE_CASES)
    assert {d for _, d in quick} == {"fp32", "bf16", "fp16"}
    assert cases([], "cpu") == list(loss.CPU_CASES)  # the short profile by default on a CPU
    assert cases(["--shapes", "ade20k", "--dtypes", "fp16"], "cpu") == [("ade20k", "fp16")]


def test_loss_prints_and_writes_each_case_as_it_finishes(tmp_path, monkeypatch, capsys):
    """The CPU's default profile; every provider and case is printed and loss.json rewritten as it finishes,
    so a run cut short keeps (and has shown) what it measured."""
    rows_written = []
    write_json = loss.write_json
    monkeypatch.setattr(loss, "write_json", lambda path, data: (rows_written.append(len(data["results"])),
                                                                 write_json(path, data)))  # fmt: skip
    argv = ["--device", "cpu", "--size", "tiny", "--reps", "1", "--providers", "cross_entropy,reference_compile",
            "--compile-backend", "aot_eager", "--no-plots", "--out", str(tmp_path)]  # fmt: skip
    assert loss.main(argv) == 0
    data = json.loads((tmp_path / "loss.json").read_text())
    assert data["meta"]["profile"] == "cpu" and data["meta"]["reps"] == 1
    assert [(c["case"], c["dtype"]) for c in data["cases"]] == list(loss.CPU_CASES)
    # after F.cross_entropy's and the compiled reference's two rows on each case, then once at the end
    assert len(rows_written) == 2 * len(loss.CPU_CASES) + 1 and rows_written == sorted(rows_written)
    assert rows_written[0] == 2 and rows_written[-1] == len(data["results"])
    compiled = {(r["case"], r["dtype"]): r for r in data["results"] if r["provider"] == "reference_compile"}
    assert [k for k, r in compiled.items() if r["status"] == "ok"] == list(loss.CPU_COMPILE_CASES)
    assert all("the CPU profile compiles one case" in r["reason"] for r in compiled.values() if r["status"] != "ok")
    printed = capsys.readouterr().out.splitlines()
    progress = [line for line in printed if "F.cross_entropy" in line and "fwd+bwd" in line and " ms" in line]
    assert len(progress) == len(loss.CPU_CASES)
    assert printed.index(progress[-1]) < printed.index(
        next(line for line in printed if line.startswith("copy bandwidth"))
    )


def test_cpu_bf16_detection(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2 fma\n")
    assert "no native bf16" in common.cpu_bf16_problem(cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert common.cpu_bf16_problem(cpuinfo) is None
    cpuinfo.write_text("Features\t: fp asimd bf16 i8mm\n")  # aarch64
    assert common.cpu_bf16_problem(cpuinfo) is None
    assert "cannot tell" in common.cpu_bf16_problem(tmp_path / "missing")


TRAINING_ARGS = ["--device", "cpu", "--size", "tiny", "--model", "encdec", "--rounds", "2", "--iters", "1",
                 "--warmup", "1"]  # fmt: skip


def test_training_benchmark_table4(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(training, "cpu_bf16_problem", lambda: None)  # time bf16 autocast whatever this CPU has
    assert training.main([*TRAINING_ARGS, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "w/o BLV" in printed and "BLV reference" in printed
    # each precision's row as soon as it is measured, before the whole table
    assert printed.index("precision: fp32 |") < printed.index("precision: amp_bf16 |") < printed.index("precision   ")
    data = json.loads((tmp_path / "training.json").read_text())
    assert META_FIELDS <= set(data["meta"]) and data["meta"]["model"] == "encdec"
    rows = {(r["precision"], r["loss"]): r for r in data["results"]}
    assert set(rows) == {(p, loss_) for p in ("fp32", "amp_bf16") for loss_ in TRAINING_LOSSES}
    cpu_kernel = blv_kernels.backends.BACKENDS["cpu"].why_not("cpu", torch.float32) is None
    for (_, loss_), row in rows.items():
        assert TRAINING_FIELDS <= set(row)
        if loss_ in ("cross_entropy", "blv_reference") or (loss_ == "blv_cpu" and cpu_kernel):
            assert row["status"] == "ok" and row["ms_per_iter"] > 0 and row["rounds"] == 2
        else:
            assert row["status"] == "skipped" and row["reason"]
    assert rows["fp32", "cross_entropy"]["overhead_pct"] == 0


def test_training_skips_bf16_autocast_without_native_bf16(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "cpu_bf16_problem", lambda: "this CPU has no native bf16 (test)")
    assert training.choose_profile(training.parse_args(["--device", "cpu"]), torch.device("cpu")) == ("cpu", (3, 2, 1))
    argv = [*TRAINING_ARGS, "--out", str(tmp_path)]
    assert training.main(argv) == 0
    rows = {(r["precision"], r["loss"]): r for r in json.loads((tmp_path / "training.json").read_text())["results"]}
    assert rows["fp32", "cross_entropy"]["status"] == "ok"
    for loss_ in TRAINING_LOSSES:
        assert rows["amp_bf16", loss_]["status"] == "skipped"
        if loss_ in ("cross_entropy", "blv_reference"):
            assert rows["amp_bf16", loss_]["reason"] == "bf16 autocast skipped: this CPU has no native bf16 (test)"
    # asked for by name, it is timed all the same
    assert training.main([*argv, "--precisions", "amp_bf16"]) == 0
    rows = {(r["precision"], r["loss"]): r for r in json.loads((tmp_path / "training.json").read_text())["results"]}
    assert rows["amp_bf16", "cross_entropy"]["status"] == "ok"
    assert rows["fp32", "cross_entropy"]["reason"] == "not selected (--precisions)"


def test_training_falls_back_without_torchvision(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision now raises ImportError
    assert training.resolve_model("auto") == "encdec"


@pytest.mark.parametrize("model", ["fcn_resnet50", "deeplabv3_resnet50"])
def test_training_refuses_a_torchvision_model_without_torchvision(model, tmp_path, capsys, monkeypatch):
    # asked for by name, it is an argument error, not a traceback after the header
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setattr(training, "resolve_device", _no_work)
    assert training.main([*TRAINING_ARGS[:4], "--model", model, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        f"python -m benchmarks.training: error: --model {model} needs torchvision: pip install torchvision "
        "(or --model encdec)\n"
    )
    assert not (tmp_path / "out").exists()


def test_loss_checks_the_compile_backend_before_any_work(tmp_path, capsys, monkeypatch):
    # a bad one failed every compiled case at the end of a run, after loss.json was written
    monkeypatch.setattr(loss, "resolve_device", _no_work)
    assert loss.main(["--compile-backend", "bogus", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "python -m benchmarks.loss: error: argument --compile-backend: unknown backend 'bogus'; known: "
    )
    assert {"inductor", "eager", "aot_eager"} <= set(err.rstrip("\n").rsplit("known: ", 1)[1].split(", "))
    assert not (tmp_path / "out").exists()
    for backend in ("inductor", "eager", "aot_eager"):  # the debug backends too: the tests compile with aot_eager
        assert loss.parse_args(["--compile-backend", backend, "--out", str(tmp_path)]).compile_backend == backend


def _no_work(*args):
    raise AssertionError("the benchmark started on arguments it should have refused")


@pytest.mark.parametrize("module, argv", [(training, TRAINING_ARGS), (loss, LOSS_ARGS)])
@pytest.mark.parametrize(
    "out, message",
    [
        ("results.txt", "exists and is not a directory"),
        ("results.txt/run", "not a writable directory (Not a directory)"),
    ],
)
def test_unusable_out_is_refused_before_any_work(module, argv, out, message, tmp_path, capsys, monkeypatch):
    def work(*args):
        raise AssertionError("the benchmark started with an --out it cannot write to")

    monkeypatch.setattr(module, "resolve_device", work)  # the first step of a run, right after the arguments
    (tmp_path / "results.txt").write_text("keep me")
    assert module.main([*argv, "--out", str(tmp_path / out)]) == 2
    assert capsys.readouterr().err == f"python -m {module.__name__}: error: --out {tmp_path / out}: {message}\n"
    assert (tmp_path / "results.txt").read_text() == "keep me"


@pytest.mark.parametrize("module", [training, loss])
@pytest.mark.parametrize(
    "budget, problem",
    [("nan", "must be a finite number of seconds >= 0, got nan"), ("inf", "must be a finite number of seconds >= 0, got inf"),
     ("-1", "must be a finite number of seconds >= 0, got -1"), ("soon", "expected a number of seconds, got 'soon'")],
)  # fmt: skip
def test_budget_must_be_finite_seconds(module, budget, problem, capsys):
    assert module.main(["--budget-s", budget]) == 2
    assert capsys.readouterr().err == f"python -m {module.__name__}: error: argument --budget-s: {problem}\n"
    assert module.parse_args(["--budget-s", "0"]).budget_s == 0 and module.parse_args([]).budget_s == math.inf


@pytest.mark.parametrize(
    "name, available, count, problem",
    [("cuda:3", False, 0, "no CUDA device is available"), ("cuda:3", True, 2, "there are 2 CUDA device(s)"),
     ("meta", False, 0, "the benchmarks run on cpu or cuda")],
)  # fmt: skip
def test_device_errors_name_the_device_asked_for(name, available, count, problem, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(common.UsageError, match=rf"^--device {name}: {re.escape(problem)}$"):
        common.resolve_device(name)


def test_out_dir_problem_tries_and_leaves_nothing_behind(tmp_path):
    assert common.out_dir_problem(tmp_path / "a" / "b") is None
    assert not (tmp_path / "a").exists()  # made to try it, removed again
    (tmp_path / "kept").mkdir()
    assert common.out_dir_problem(tmp_path / "kept") is None
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())
    if Path("/proc/self").is_dir():  # no permission bit says so, and root may write anywhere else
        assert common.out_dir_problem(Path("/proc/nope")) == (
            "--out /proc/nope: not a writable directory (No such file or directory)"
        )


def test_gpu_check_script_parses():
    script = REPO_ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    for argv in ([], ["out", "--sweeps"]):
        usage = subprocess.run(["bash", str(script), *argv], capture_output=True, text=True)
        assert usage.returncode == 2 and "usage" in usage.stderr


def test_gpu_check_refuses_an_outdir_it_cannot_write_before_any_stage(tmp_path):
    # a file where the directory should be, or a directory under it: OUT came out empty and the logs went to /
    script = REPO_ROOT / "benchmarks" / "gpu_check.sh"
    (tmp_path / "file").write_text("")
    for outdir in (tmp_path / "file", tmp_path / "file" / "sub"):
        result = subprocess.run(
            ["bash", str(script), str(outdir), "--sweep"], capture_output=True, text=True, timeout=60
        )
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr == f"gpu_check.sh: OUTDIR {outdir} is not a writable directory\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the sweep runs for real")
def test_gpu_check_sweep_mode_runs_its_stages_and_reports_without_a_gpu(tmp_path):
    # the second device call's control flow, here where a mistake costs nothing: every stage runs
    # and is listed, the sweep's one-line refusal is shown, and the exit status says it failed
    script = REPO_ROOT / "benchmarks" / "gpu_check.sh"
    env = {**os.environ, "PYTHON": sys.executable, "BLV_KERNELS_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(["bash", str(script), str(tmp_path / "out"), "--sweep"], capture_output=True, text=True,
                            env=env, timeout=300)  # fmt: skip
    assert result.returncode == 1, result.stdout[-2000:]
    for stage in ("env", "cuda-ext", "sweep"):
        assert f"== {stage} (cap" in result.stdout and (tmp_path / "out" / f"{stage}.log").exists()
    assert "the measured sweep needs a CUDA device" in result.stdout and "GPU sweep: FAILED" in result.stdout


@pytest.mark.parametrize(
    "name, text, problem",
    [
        ("loss.json", "{bad", "not valid JSON (Expecting property name enclosed in double quotes"),
        ("loss.json", "[" * 100_000 + "]" * 100_000, "not valid JSON (maximum recursion depth exceeded"),
        ("loss.json", '{"meta": {}}', "incomplete or not a result file (KeyError: 'providers')"),
        ("training.json", "[]", "incomplete or not a result file (TypeError: "),
        ("static_report.json", '{"case": 1}', "incomplete or not a result file (TypeError: "),
    ],
)
def test_summary_of_a_bad_file_is_one_line_that_names_it(name, text, problem, tmp_path, capsys):
    (tmp_path / name).write_text(text)
    assert summary.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"python -m benchmarks.summary: error: {tmp_path / name}: {problem}")


def test_summary_of_a_missing_directory_says_so(tmp_path, capsys):
    assert summary.main([str(tmp_path / "nope")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"python -m benchmarks.summary: error: {tmp_path / 'nope'}: no such directory\n"


def test_static_estimate_beside_the_measured_time():
    static = [{"case": "8x19x512x1024-fp32-nchw", "shape": [8, 19, 512, 1024], "dtype": "fp32", "layout": "nchw",
               "total_per_element": 60.0, "predicted_ms": 0.30, "issue_ms": 0.30, "efficiency": 0.5},
              {"case": "65536x1000-bf16-rows", "shape": [65536, 1000], "dtype": "bf16", "layout": "rows",
               "total_per_element": 90.0, "predicted_ms": 0.2, "issue_ms": 0.2, "efficiency": 0.7},
              {"case": "8x19x512x1024-fp32-channels_last", "shape": [8, 19, 512, 1024], "dtype": "fp32",
               "layout": "channels_last", "total_per_element": 60.0, "predicted_ms": 0.60, "issue_ms": 0.30,
               "access_ms": 0.60, "efficiency": 0.5, "bound": "access"}]  # fmt: skip
    loss_data = {"results": [
        {"provider": "triton", "pass": "fwd_bwd", "status": "ok", "shape": [8, 19, 512, 1024], "dtype": "fp32",
         "layout": "contiguous", "ms": 0.60},
        {"provider": "triton", "pass": "fwd", "status": "ok", "shape": [8, 19, 512, 1024], "dtype": "fp32",
         "layout": "contiguous", "ms": 0.10},
        {"provider": "triton", "pass": "fwd_bwd", "status": "ok", "shape": [8, 19, 512, 1024], "dtype": "fp32",
         "layout": "channels_last", "ms": 1.20},
    ]}  # fmt: skip
    lines = summary.static_summary(static, loss_data).splitlines()
    matched = next(line for line in lines if line.startswith("8x19x512x1024-fp32-nchw")).split()
    # measured twice the prediction: the model's efficiency was twice what the card gave
    assert matched[1:] == ["60.0", "0.300", "issue", "0.600", "eager", "2.00", "0.25"]
    unmatched = next(line for line in lines if line.startswith("65536x1000-bf16-rows")).split()
    assert unmatched[1:] == ["90.0", "0.200", "issue"]
    # access-bound: measured 1.2 ms against 0.6 predicted, the L1 took lines at half the model's rate
    access = next(line for line in lines if line.startswith("8x19x512x1024-fp32-channels_last")).split()
    assert access[1:] == ["60.0", "0.600", "access", "1.200", "eager", "2.00",
                          f"{sass.H100_LINES_PER_CLOCK / 2:.2f}", "lines/clk"]  # fmt: skip
    # the sweep's graph-replayed time of kernel_config's choice (kernels only) is preferred
    sweep_data = {"results": [
        {"case": "8x19x512x1024-fp32-nchw", "backend": "triton", "chosen": False, "status": "ok", "ms": 0.2},
        {"case": "8x19x512x1024-fp32-nchw", "backend": "triton", "chosen": True, "status": "ok", "ms": 0.45},
        {"case": "8x19x512x1024-fp32-nchw", "backend": "cuda", "status": "ok", "ms": 0.3},
    ]}  # fmt: skip
    lines = summary.static_summary(static, loss_data, sweep_data).splitlines()
    matched = next(line for line in lines if line.startswith("8x19x512x1024-fp32-nchw")).split()
    assert matched[1:] == ["60.0", "0.300", "issue", "0.450", "graph", "1.50", "0.33"]


def test_host_runs_on_one_thread_and_stamps_the_count(capsys, monkeypatch):
    # torch's intra-op threads contend on a busy CPU: F.cross_entropy took 1000 times as long there
    threads_seen = []

    def measure(calls, device):
        threads_seen.append(torch.get_num_threads())
        return [("F.cross_entropy", 20.0, None, "its whole call")]

    monkeypatch.setattr(host, "measure", measure)
    with common.torch_threads(2):  # what torch takes on a machine with cores to spare
        assert host.main([]) == 0
        assert host.main(["--threads", "2"]) == 0
        assert torch.get_num_threads() == 2  # the run's threads are the run's only
    assert threads_seen == [1, 2]
    headers = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Host time")]
    assert [" | 1 torch thread(s) | " in headers[0], " | 2 torch thread(s) | " in headers[1]] == [True, True]


def test_stamp_says_the_threads_and_reads_files_without_them():
    env = common.environment(torch.device("cpu"))
    assert env["threads"] == torch.get_num_threads()
    assert f" | {env['threads']} torch thread(s) | torch " in common.stamp_line(env)
    older = {k: v for k, v in env.items() if k != "threads"}  # a result file written before the field
    assert "thread" not in common.stamp_line(older)


# Every benchmark's command line, run as people run it. Plain argparse printed its usage first;
CLIS = ("loss", "training", "host", "sweep", "summary", "longtail", "static_report", "cuda_static_report")


@pytest.mark.parametrize("name", CLIS)
def test_every_benchmark_cli_refuses_an_unknown_argument_in_one_line(name):
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--bogus"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert (result.returncode, result.stdout) == (2, "")
    if name == "summary":  # (its directory is missing too, which argparse says first)
        assert result.stderr == "python -m benchmarks.summary: error: the following arguments are required: out\n"
    else:
        assert result.stderr == f"python -m benchmarks.{name}: error: unrecognized arguments: --bogus\n"


@pytest.mark.parametrize(
    "module, argv, message",
    [(loss, ["--shapes", ""], "--shapes: unknown ['']"), (training, ["--precisions", ""], "--precisions: unknown ['']"),
     (loss, ["--device", "meta"], "--device meta: the benchmarks run on cpu or cuda")],
)  # fmt: skip
def test_bad_arguments_are_one_line_before_any_work(module, argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(module, "run_case" if module is loss else "time_precision", _no_work)
    assert module.main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"python -m {module.__name__}: error: {message}")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_host_on_cuda_without_a_device_is_a_one_line_error(capsys):
    assert host.main(["--device", "cuda"]) == 2
    assert capsys.readouterr().err == "python -m benchmarks.host: error: --device cuda: no CUDA device here\n"


def test_host_times_each_provider_and_puts_the_triton_launches_back(capsys):
    pytest.importorskip("triton")
    from blv_kernels.backends import triton_kernel

    launch, interpret = triton_kernel.Launch.__call__, os.environ.get("TRITON_INTERPRET")
    assert host.main(["--calls", "3"]) == 0
    assert triton_kernel.Launch.__call__ is launch and os.environ.get("TRITON_INTERPRET") == interpret
    printed = capsys.readouterr().out.splitlines()[1:]
    rows = dict(re.match(r"\s+(F\.cross_entropy|BLV cpu|BLV triton stub)\s+(.+)", row).groups() for row in printed)
    assert list(rows) == ["F.cross_entropy", "BLV cpu", "BLV triton stub"]
    for provider, text in rows.items():  # (the CPU kernel needs a C++ compiler)
        assert re.match(r"[\d.]+ us +[\d.]+x", text) or (provider == "BLV cpu" and text.startswith("not run ("))
