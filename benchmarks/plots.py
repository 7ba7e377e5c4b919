"""PNG plots of the micro-benchmark, for people who would rather look than read.

One panel per dtype, the shapes along the x axis, a bar per provider; a provider not timed on a
case is marked with an x at its place, and those timed nowhere are listed under the plot with
the reason.
"""

from __future__ import annotations

import math
from pathlib import Path

FONT_SIZE = 10
MAX_WIDTH_IN = 13.0  # wider than a laptop screen shows at once
PANEL_HEIGHT_IN = 3.4
NOTE_CHARS = 110  # a skip reason is cut to this in the note under the plot


def not_timed_notes(data: dict) -> list[str]:
    """A line per provider timed on no case in this run, with the reason (as loss.json gives it)."""
    timed = {r["provider"] for r in data["results"] if r["status"] == "ok"}
    notes = []
    for provider, spec in data["providers"].items():
        if provider in timed:
            continue
        reason = spec["reason"] or next((r["reason"] for r in data["results"] if r["provider"] == provider), None)
        text = f"{spec['label']}: not timed ({reason or 'no case'})"
        notes.append(text if len(text) <= NOTE_CHARS else text[: NOTE_CHARS - 3] + "...")
    return notes


def _case_label(case: dict) -> str:
    """The case's name (its -cl suffix says channels_last) over its shape."""
    return f"{case['case']}\n{'x'.join(map(str, case['shape']))}"


def pyplot():
    """``matplotlib.pyplot`` drawing to files only (no display on a benchmark machine), or None
    when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_loss(data: dict, out_dir: Path) -> str:
    """Write loss_time.png and loss_bandwidth.png (forward+backward); returns a line saying what was done."""
    plt = pyplot()
    if plt is None:
        return "plots skipped: matplotlib is not installed (pip install '.[bench]')"

    rows = {(r["provider"], r["case"], r["dtype"]): r for r in data["results"] if r["pass"] == "fwd_bwd"}
    providers = [p for p in data["providers"] if any(r["status"] == "ok" for k, r in rows.items() if k[0] == p)]
    if not providers:
        return "plots skipped: no provider was timed"
    dtypes = list(dict.fromkeys(c["dtype"] for c in data["cases"]))
    most_cases = max(sum(c["dtype"] == d for c in data["cases"]) for d in dtypes)
    width = min(MAX_WIDTH_IN, max(7.0, 2.0 + 0.3 * len(providers) * most_cases))
    notes = not_timed_notes(data)
    note_lines = ["x: not timed on that case (skipped or failed: see loss.json)", *notes]
    note_height = 0.2 * len(note_lines) + 0.2
    legend_columns = min(len(providers), 4)
    header_height = 0.4 + 0.22 * math.ceil(len(providers) / legend_columns)  # title, then the legend's rows
    height = header_height + PANEL_HEIGHT_IN * len(dtypes) + note_height
    colors = {p: f"C{i}" for i, p in enumerate(data["providers"])}  # a provider keeps its colour across runs
    title = f"BLV loss, forward+backward | {data['meta']['device']} | {data['meta']['date'][:10]}"
    written = []
    for name, field, ylabel, log in (
        ("loss_time.png", "ms", "median ms (20-80% bars)", True),
        ("loss_bandwidth.png", "pct_copy_bandwidth", "% of copy bandwidth", False),
    ):
        fig, axes = plt.subplots(len(dtypes), 1, figsize=(width, height), squeeze=False)
        bar = 0.8 / len(providers)
        for ax, dtype in zip(axes[:, 0], dtypes, strict=True):
            cases = [c for c in data["cases"] if c["dtype"] == dtype]
            timed = False
            for i, provider in enumerate(providers):
                offset = (i - (len(providers) - 1) / 2) * bar
                for x, case in enumerate(cases):
                    row = rows.get((provider, case["case"], dtype))
                    if row is None or row["status"] != "ok":
                        # at the bottom of the axes whatever the scale: x in data, y in axes coordinates
                        ax.plot(x + offset, 0.04, "x", color=colors[provider], transform=ax.get_xaxis_transform())
                        continue
                    errors = None
                    if field == "ms":
                        errors = [[row["ms"] - row["ms_p20"]], [row["ms_p80"] - row["ms"]]]
                    ax.bar(x + offset, row[field], bar, yerr=errors, color=colors[provider])
                    timed = True
            ax.set_xticks(range(len(cases)), [_case_label(c) for c in cases], fontsize=FONT_SIZE - 1)
            ax.tick_params(axis="y", labelsize=FONT_SIZE - 1)
            ax.set_ylabel(f"{dtype}: {ylabel}", fontsize=FONT_SIZE)
            ax.set_xlim(-0.6, most_cases - 0.4)  # the same bar width in every panel
            if log and timed:  # a log scale of a panel with no bar has no range (matplotlib raises)
                ax.set_yscale("log")
            ax.grid(axis="y", alpha=0.3)
        handles = [plt.Rectangle((0, 0), 1, 1, color=colors[p]) for p in providers]
        fig.legend(handles, [data["providers"][p]["label"] for p in providers], loc="upper center",
                   ncol=legend_columns, fontsize=FONT_SIZE, frameon=False,
                   bbox_to_anchor=(0.5, 1 - 0.3 / height))  # fmt: skip
        fig.suptitle(title, fontsize=FONT_SIZE + 1, y=1 - 0.08 / height)
        fig.text(0.01, 0.01, "\n".join(note_lines), fontsize=FONT_SIZE - 2, va="bottom", ha="left")
        fig.tight_layout(rect=(0, note_height / height, 1, 1 - header_height / height))
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return "wrote " + ", ".join(written)
