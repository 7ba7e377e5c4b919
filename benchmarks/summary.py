"""``python -m benchmarks.summary DIR``: the short tables of a benchmark run, from its JSON files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import stamp_line
from .training import table4


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


def static_summary(static_reports: list[dict], loss_data: dict | None) -> str:
    """The static estimate of each case beside the measured Triton forward+backward time (where
    loss.json has the same shape, dtype and layout), and the issue efficiency the measurement
    implies: the number to recalibrate ``sass.EFFICIENCY_CALIBRATION`` with."""
    measured = {}
    for r in (loss_data or {}).get("results", []):
        if r["provider"] == "triton" and r["pass"] == "fwd_bwd" and r["status"] == "ok":
            measured[(tuple(r["shape"]), r["dtype"], r["layout"])] = r["ms"]
    lines = [
        "Static estimate (sm_90 SASS) beside the measured Triton forward+backward",
        f"{'case':34}{'instr/elem':>11}{'predicted ms':>14}{'measured ms':>13}{'measured/pred':>15}{'efficiency':>12}",
    ]
    for r in static_reports:
        ms = measured.get((tuple(r["shape"]), r["dtype"], _LAYOUTS[r["layout"]]))
        cells = ["", "", ""]
        if ms is not None:
            implied = r["efficiency"] * r["issue_ms"] / ms  # the efficiency at which the model gives ms
            cells = [f"{ms:.3f}", f"{ms / r['predicted_ms']:.2f}", f"{implied:.2f}"]
        lines.append(f"{r['case']:34}{r['total_per_element']:11.1f}{r['predicted_ms']:14.3f}{cells[0]:>13}"
                     f"{cells[1]:>15}{cells[2]:>12}")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.summary", description=__doc__)
    parser.add_argument("out", type=Path, help="the directory with loss.json and/or training.json")
    args = parser.parse_args(argv)
    found = False
    for name, summarize in (("loss.json", loss_summary), ("training.json", table4)):
        path = args.out / name
        if path.exists():
            found = True
            print(summarize(json.loads(path.read_text())) + "\n")
        else:
            print(f"{path}: missing (that stage did not write it)\n")
    static = args.out / "static_report.json"
    if static.exists():
        loss = args.out / "loss.json"
        print(static_summary(json.loads(static.read_text()), json.loads(loss.read_text()) if loss.exists() else None))
    return 0 if found else 1


if __name__ == "__main__":
    raise SystemExit(main())
