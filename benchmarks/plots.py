"""PNG plots of the micro-benchmark, for people who would rather look than read."""

from __future__ import annotations

from pathlib import Path


def plot_loss(data: dict, out_dir: Path) -> str:
    """Write loss_time.png and loss_bandwidth.png (forward+backward); returns a line saying what was done."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a benchmark machine
        import matplotlib.pyplot as plt
    except ImportError:
        return "plots skipped: matplotlib is not installed (pip install '.[bench]')"

    rows = [r for r in data["results"] if r["pass"] == "fwd_bwd" and r["status"] == "ok"]
    cases = list(dict.fromkeys(f"{r['case']}\n{r['dtype']}" for r in data["results"]))
    providers = [p for p in data["providers"] if any(r["provider"] == p for r in rows)]
    if not rows:
        return "plots skipped: no provider was timed"
    title = f"BLV loss, forward+backward | {data['meta']['device']} | {data['meta']['date'][:10]}"
    written = []
    for name, field, ylabel, log in (
        ("loss_time.png", "ms", "median time (ms), 20-80% bars", True),
        ("loss_bandwidth.png", "pct_copy_bandwidth", "% of the measured copy bandwidth", False),
    ):
        fig, ax = plt.subplots(figsize=(max(8.0, 1.1 * len(cases) + 2), 5))
        width = 0.8 / max(len(providers), 1)
        for i, provider in enumerate(providers):
            mine = {f"{r['case']}\n{r['dtype']}": r for r in rows if r["provider"] == provider}
            xs = [x + (i - (len(providers) - 1) / 2) * width for x, c in enumerate(cases) if c in mine]
            ys = [mine[c][field] for c in cases if c in mine]
            errors = None
            if field == "ms":
                errors = [[mine[c]["ms"] - mine[c]["ms_p20"] for c in cases if c in mine],
                          [mine[c]["ms_p80"] - mine[c]["ms"] for c in cases if c in mine]]  # fmt: skip
            ax.bar(xs, ys, width, yerr=errors, label=data["providers"][provider]["label"])
        ax.set_xticks(range(len(cases)), cases, fontsize=7)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    return "wrote " + ", ".join(written)
