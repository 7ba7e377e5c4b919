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
    return 0 if found else 1


if __name__ == "__main__":
    raise SystemExit(main())
