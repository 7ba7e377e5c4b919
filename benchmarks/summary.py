"""``python -m benchmarks.summary DIR``: the short tables of a benchmark run, from its JSON files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import sass
from .common import ArgumentParser, UsageError, command, stamp_line
from .training import table4

PROG = "python -m benchmarks.summary"


def loss_summary(data: dict) -> str:
    """Forward+backward medians, one row per case and one column per provider, beside the floor."""
    providers = list(data["providers"])
    labels = [data["providers"][p]["label"] for p in providers]
    lines = [
        f"BLV loss, forward+backward median ms | {stamp_line(data['meta'])}",
        f"{data['meta']['note']}; copy bandwidth {data['copy_bandwidth']['gbps']:.0f} GB/s",
        f"{'case':<26}{'floor':>9}" + "".join(f"{label:>18}" for label in labels),
    ]
    cells: dict[str, dict[str, str]] = {}
    floors: dict[str, float] = {}
    for r in data["results"]:
        if r["pass"] != "fwd_bwd":
            continue
        case = f"{r['case']}-{r['dtype']}"
        floors[case] = r["floor_ms"]
        text = {"ok": f"{r['ms']:.3f}" if r["ms"] is not None else "", "skipped": "-", "failed": "FAILED"}[r["status"]]
        cells.setdefault(case, {})[r["provider"]] = text
    for case, row in cells.items():
        lines.append(f"{case:<26}{floors[case]:>9.4g}" + "".join(f"{row.get(p, '?'):>18}" for p in providers))
    reasons = {
        data["providers"][p]["label"]: data["providers"][p]["reason"]
        for p in providers
        if data["providers"][p]["reason"]
    }
    lines += [f"  {label}: {reason}" for label, reason in reasons.items()]
    return "\n".join(lines)


# static_report case layouts -> loss.json layouts
_LAYOUTS = {"nchw": "contiguous", "rows": "contiguous", "channels_last": "channels_last"}


def static_summary(static_reports: list[dict], loss_data: dict | None, sweep_data: dict | None = None) -> str:
    """The static estimate of each case beside the measured Triton step, and what the measurement
    implies for the model's bound: the issue efficiency (to recalibrate
    ``sass.EFFICIENCY_CALIBRATION`` with), or for an access-bound case the L1's lines per SM and
    clock (``sass.H100_LINES_PER_CLOCK``). The
    measurement is the sweep's (``sweep.json``: kernel_config's choice, kernels only, replayed in a
    CUDA graph) where it has the case, else loss.json's eager forward+backward of the same shape,
    dtype and layout (which includes the host's time per call where that is the longer)."""
    measured = {}
    for r in (loss_data or {}).get("results", []):
        if r["provider"] == "triton" and r["pass"] == "fwd_bwd" and r["status"] == "ok":
            measured[(tuple(r["shape"]), r["dtype"], r["layout"])] = (r["ms"], "eager")
    graphed = {r["case"]: r["ms"] for r in (sweep_data or {}).get("results", [])
               if r["backend"] == "triton" and r.get("chosen") and r["status"] == "ok"}  # fmt: skip
    lines = [
        "Static estimate (sm_90 SASS) beside the measured Triton step (graph: kernels only; eager: per call)",
        f"{'case':34}{'instr/elem':>11}{'predicted ms':>14}{'bound':>8}{'measured ms':>13}{'':>7}"
        f"{'measured/pred':>15}{'implied':>16}",
    ]  # fmt: skip
    for r in static_reports:
        found = (graphed[r["case"]], "graph") if r["case"] in graphed else measured.get(
            (tuple(r["shape"]), r["dtype"], _LAYOUTS[r["layout"]]))  # fmt: skip
        cells, bound = ["", "", "", ""], r.get("bound", "issue")
        if found is not None:
            ms, source = found
            if bound == "access":  # the line rate at which the model gives ms
                implied = f"{sass.H100_LINES_PER_CLOCK * r['access_ms'] / ms:.2f} lines/clk"
            else:  # the efficiency at which it does
                implied = f"{r['efficiency'] * r['issue_ms'] / ms:.2f}"
            cells = [f"{ms:.3f}", source, f"{ms / r['predicted_ms']:.2f}", implied]
        lines.append(f"{r['case']:34}{r['total_per_element']:11.1f}{r['predicted_ms']:14.3f}{bound:>8}{cells[0]:>13}"
                     f"{cells[1]:>7}{cells[2]:>15}{cells[3]:>16}")  # fmt: skip
    return "\n".join(lines)


class SummaryError(Exception):
    """A result file that cannot be summarized: one line that names it, exit status 1."""


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except OSError as error:
        raise SummaryError(f"{path}: cannot be read ({error.strerror or error})") from None
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError; nested too deep
        raise SummaryError(f"{path}: not valid JSON ({error})") from None


def summarized(summarize, paths: list[Path]) -> str:
    """``summarize`` of the files at ``paths`` (None for one that is missing): a file cut short or of
    another kind lacks what it reads, which raises a SummaryError that names the files."""
    try:
        return summarize(*(read_json(path) if path.exists() else None for path in paths))
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
        names = ", ".join(str(path) for path in paths if path.exists())
        raise SummaryError(f"{names}: incomplete or not a result file ({type(error).__name__}: {error})") from None


@command(PROG)
def main(argv=None) -> int:
    parser = ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("out", type=Path, help="the directory with loss.json and/or training.json")
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        raise UsageError(f"{args.out}: {'not a directory' if args.out.exists() else 'no such directory'}")
    try:
        return print_summaries(args.out)
    except SummaryError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1


def print_summaries(out: Path) -> int:
    found = False
    for name, summarize in (("loss.json", loss_summary), ("training.json", table4)):
        path = out / name
        if path.exists():
            found = True
            print(summarized(summarize, [path]) + "\n")
        else:
            print(f"{path}: missing (that stage did not write it)\n")
    static = out / "static_report.json"
    if static.exists():
        print(summarized(static_summary, [static, out / "loss.json", out / "sweep.json"]))
    return 0 if found else 1


if __name__ == "__main__":
    raise SystemExit(main())
