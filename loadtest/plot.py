"""The PNG of a load test: latency distributions (CDFs) on top, throughput and load over time below."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .stats import percentile


def plot_run(records: Sequence, report: dict, path: str | Path, title: str | None = None) -> None:
    """records: the run's RequestRecords; report: its summary (`loadtest.summarize`)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.ok]
    series = report["timeseries"]
    fig = plt.figure(figsize=(11, 7.5), dpi=90, layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=(1, 1))

    ax = fig.add_subplot(grid[0, 0])
    _latency_cdf(ax, {"TTFT": [r.ttft for r in ok if r.ttft is not None], "end-to-end": [r.e2e for r in ok]},
                  ("tab:blue", "tab:orange"), "request latency")

    ax = fig.add_subplot(grid[0, 1])
    _latency_cdf(ax, {"inter-token (ITL)": [g for r in ok for g in r.itl],
                       "per output token (TPOT)": [r.tpot for r in ok if r.tpot is not None]},
                  ("tab:green", "tab:purple"), "token latency")

    ax = fig.add_subplot(grid[1, :])
    t = series["t"]
    ax.plot(t, series["output_tokens_per_s"], color="tab:blue", lw=1.6, label="output tokens/s")
    ax.axhline(report["output_tokens_per_s"], color="tab:blue", ls=":", lw=1,
               label=f"run average {report['output_tokens_per_s']:.0f} tok/s")
    ax.set_xlabel("time since the first request (s)")
    ax.set_ylabel("output tokens/s", color="tab:blue")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    right = ax.twinx()
    right.plot(t, series["in_flight"], color="tab:gray", lw=1.2, label="requests in flight")
    if any(series["failed_per_s"]):
        right.plot(t, series["failed_per_s"], color="tab:red", lw=1.2, label="failed requests/s")
    right.set_ylabel("requests")
    right.set_ylim(0, max(series["in_flight"] + series["failed_per_s"] + [1.0]) * 1.15)
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="lower center", fontsize=8, ncol=4)
    ax.set_title("throughput and load over time", fontsize=10)

    s = report["settings"]
    load = f"rate {s['rate']}/s" if s["rate"] else f"concurrency {s['concurrency']}"
    errors = ", ".join(f"{k}: {v}" for k, v in report["errors_by_status"].items()) or "none"
    fig.suptitle(
        (title + "\n" if title else "")
        + f"{report['requests']} requests ({report['ok']} ok; errors {errors}), {len(s['models'])} model(s) "
        f"{s['distribution']}, {load}, {s['options']['max_tokens']} tokens each: "
        f"{report['output_tokens_per_s']:.0f} output tok/s, {report['requests_per_s']:.1f} req/s",
        fontsize=10,
    )
    fig.savefig(path)
    plt.close(fig)


def _latency_cdf(ax, samples: dict[str, list[float]], colors, title: str) -> None:
    """Empirical CDFs in ms on a log axis (readable whatever the spread), with each p50 and p99 marked."""
    drawn = False
    for (label, values), color in zip(samples.items(), colors):
        values = [v for v in values if v > 0]
        if not values:
            continue
        ms = sorted(1000 * v for v in values)
        p50, p99 = percentile(ms, 50), percentile(ms, 99)
        fraction = [(i + 1) / len(ms) for i in range(len(ms))]
        ax.step(ms, fraction, where="post", color=color, lw=1.6, label=f"{label}: p50 {p50:.1f}, p99 {p99:.1f} ms")
        ax.plot([p50, p99], [0.5, 0.99], "o", color=color, ms=4)
        drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no data (not streamed, or no request succeeded)", ha="center", va="center",
                transform=ax.transAxes)
    else:
        ax.set_xscale("log")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("milliseconds (log scale; dots: p50 and p99)")
    ax.set_ylabel("share of samples at or below")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
