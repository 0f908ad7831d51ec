#!/usr/bin/env python3
"""Draws the panels of dynacache.dashboard.json from a real Prometheus.

Grafana itself is not needed: every panel's queries are sent, as the
dashboard JSON writes them, to Prometheus's /api/v1/query_range, and the
answers are drawn with matplotlib where the panel's gridPos puts them
(24 columns, rows of 30 px in Grafana; here one grid unit each). Grafana's
variables are replaced as an "All" selection would: $job and $instance by
.+, $__rate_interval by --rate-interval.

    python3 render.py --prometheus http://127.0.0.1:9090 --start -15m --out dashboard.png

Needs matplotlib (pip install matplotlib). scenario.py runs a real
dynacache fleet under load and faults and calls this at the end.
"""

import argparse
import json
import math
import time
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.gridspec import GridSpec  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

HERE = Path(__file__).resolve().parent

# Grafana's dark theme, roughly.
BACKGROUND = "#111217"
PANEL = "#181b1f"
TEXT = "#ccccdc"
GRID = "#2c3235"
PALETTE = [
    "#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2",
    "#b877d9", "#705da0", "#37872d", "#fade2a", "#447ebc", "#c15c17",
    "#890f02", "#0a437c", "#6d1f62", "#584477",
]
THRESHOLD_COLORS = {"green": "#73bf69", "red": "#f2495c", "orange": "#ff9830", "yellow": "#fade2a"}


def grafana_to_promql(expr, rate_interval):
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$job", ".+")
        .replace("$instance", ".+")
    )


def query_range(prometheus, expr, start, end, step):
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}", timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def legend(fmt, labels):
    if not fmt:
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__") or "value"
    out = fmt
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value).replace("{{ " + key + " }}", value)
    # Labels the series does not have render empty, as in Grafana.
    while "{{" in out and "}}" in out:
        a = out.index("{{")
        b = out.index("}}", a)
        out = out[:a] + out[b + 2:]
    return out.strip()


def si(value, suffix=""):
    if value is None or math.isnan(value):
        return "-"
    if value == 0:
        return f"0{suffix}"
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{prefix}{suffix}"
    return f"{value:.3g}{suffix}"


def seconds(value):
    if value is None or math.isnan(value):
        return "-"
    if value == 0:
        return "0"
    for factor, unit in ((1, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {unit}"
    return f"{value * 1e9:.3g} ns"


def bytes_(value):
    if value is None or math.isnan(value):
        return "-"
    for factor, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {unit}"
    return f"{value:.0f} B"


def formatter(unit):
    return {
        "percentunit": lambda v: f"{v * 100:.3g}%" if not math.isnan(v) else "-",
        "s": seconds,
        "bytes": bytes_,
        "Bps": lambda v: bytes_(v) + "/s" if not math.isnan(v) else "-",
        "reqps": lambda v: si(v, " req/s"),
        "ops": lambda v: si(v, " ops/s"),
    }.get(unit, lambda v: si(v))


def style(ax):
    ax.set_facecolor(PANEL)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.tick_params(colors=TEXT, labelsize=7, length=0)
    ax.grid(True, color=GRID, linewidth=0.6)
    ax.set_axisbelow(True)


def draw_marks(ax, marks):
    for start, end, label in marks:
        ax.axvspan(
            datetime.fromtimestamp(start, timezone.utc),
            datetime.fromtimestamp(end, timezone.utc),
            color="#f2495c", alpha=0.12, linewidth=0,
        )


def timeseries(ax, panel, series, marks):
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    custom = defaults.get("custom", {})
    unit = defaults.get("unit", "short")
    fmt = formatter(unit)
    log = custom.get("scaleDistribution", {}).get("type") == "log"
    step = custom.get("lineInterpolation") == "stepAfter"
    stacked = custom.get("stacking", {}).get("mode") == "normal"
    style(ax)
    draw_marks(ax, marks)
    drawn = 0
    base = None
    for i, (name, times, values) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        if stacked:
            if base is None or len(base) != len(values):
                base = [0.0] * len(values)
            top = [b + (0.0 if math.isnan(v) else v) for b, v in zip(base, values)]
            ax.fill_between(times, base, top, color=color, alpha=0.35, linewidth=0, step="post" if step else None)
            ax.plot(times, top, color=color, linewidth=1, label=name, drawstyle="steps-post" if step else "default")
            base = top
        else:
            if log:
                values = [v if v > 0 else math.nan for v in values]
            ax.plot(times, values, color=color, linewidth=1.1, label=name,
                    drawstyle="steps-post" if step else "default")
            ax.fill_between(times, values, color=color, alpha=0.06, linewidth=0,
                            step="post" if step else None)
        drawn += 1
    if log and drawn:
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())
    elif "min" in defaults:
        ax.set_ylim(bottom=defaults["min"])
    if "max" in defaults and not log:
        top = defaults["max"]
        ax.set_ylim(top=top * 1.05 if top else None)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v)))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=timezone.utc))
    ax.xaxis.set_major_locator(mdates.MinuteLocator(byminute=range(0, 60, 2)))
    if drawn:
        handles, labels = ax.get_legend_handles_labels()
        keep = 12
        leg = ax.legend(
            handles[:keep],
            labels[:keep] if len(labels) <= keep else labels[: keep - 1] + [f"... {len(labels) - keep + 1} more"],
            loc="upper left", bbox_to_anchor=(0, -0.1), ncol=3, fontsize=6.5, frameon=False,
            labelcolor=TEXT, handlelength=1.2, columnspacing=1.0,
        )
        leg.set_in_layout(False)
    else:
        ax.text(0.5, 0.5, "No data", color=TEXT, ha="center", va="center", transform=ax.transAxes)


def stat(ax, panel, series, marks):
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    fmt = formatter(defaults.get("unit", "short"))
    steps = defaults.get("thresholds", {}).get("steps", [{"color": "green", "value": None}])
    ax.set_facecolor(PANEL)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_xticks([])
    ax.set_yticks([])
    if not series:
        ax.text(0.5, 0.5, "No data", color=TEXT, ha="center", va="center", transform=ax.transAxes)
        return
    _, times, values = series[0]
    last = next((v for v in reversed(values) if not math.isnan(v)), math.nan)
    color = THRESHOLD_COLORS["green"]
    for s in steps:
        if s.get("value") is None or (not math.isnan(last) and last >= s["value"]):
            color = THRESHOLD_COLORS.get(s["color"], s["color"])
    draw_marks(ax, marks)
    ax.fill_between(times, values, color=color, alpha=0.18, linewidth=0)
    ax.plot(times, values, color=color, linewidth=0.8, alpha=0.7)
    finite = [v for v in values if not math.isnan(v)]
    if finite:
        low, high = min(finite + [0]), max(finite)
        ax.set_ylim(low, high * 2.2 if high > 0 else 1)
    decimals = defaults.get("decimals")
    text = fmt(last)
    if decimals is not None and not math.isnan(last) and defaults.get("unit") in ("none", "short"):
        text = f"{last:.{decimals}f}"
    if defaults.get("unit") == "none" and not math.isnan(last):
        text = f"{last:g}"
    ax.text(0.5, 0.55, text, color=color, ha="center", va="center", fontsize=20,
            fontweight="bold", transform=ax.transAxes)


def render(prometheus, dashboard_path, start, end, step, out, rate_interval, title, marks):
    dashboard = json.loads(Path(dashboard_path).read_text())
    panels = dashboard["panels"]
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    unit = 0.36  # inches per grid row
    fig = plt.figure(figsize=(24 * 0.95, height * unit + 0.9), facecolor=BACKGROUND)
    top = 1 - 0.9 / (height * unit + 0.9)
    grid = GridSpec(height, 24, figure=fig, left=0.005, right=0.995, top=top, bottom=0.01,
                    hspace=0.0, wspace=0.0)
    span = f"{datetime.fromtimestamp(start, timezone.utc):%Y-%m-%d %H:%M}-{datetime.fromtimestamp(end, timezone.utc):%H:%M} UTC"
    fig.text(0.01, 1 - 0.35 / (height * unit + 0.9), f"{title}   {span}", color=TEXT, fontsize=15,
             fontweight="bold", va="center")
    if marks:
        legend_text = "   ".join(f"shaded: {label}" if i == 0 else label for i, (_, _, label) in enumerate(marks))
        fig.text(0.995, 1 - 0.35 / (height * unit + 0.9), legend_text, color="#f2495c", fontsize=10,
                 ha="right", va="center")
    for panel in panels:
        g = panel["gridPos"]
        if panel["type"] == "row":
            ax = fig.add_subplot(grid[g["y"]:g["y"] + g["h"], :])
            ax.axis("off")
            ax.text(0.0, 0.3, panel["title"], color=TEXT, fontsize=12, fontweight="bold",
                    transform=ax.transAxes)
            continue
        # Leave room for the title above and, for graphs, the legend below.
        rows = slice(g["y"], g["y"] + g["h"])
        cols = slice(g["x"], g["x"] + g["w"])
        ax = fig.add_subplot(grid[rows, cols])
        series = []
        for target in panel.get("targets", []):
            expr = grafana_to_promql(target["expr"], rate_interval)
            for s in query_range(prometheus, expr, start, end, step):
                times = [datetime.fromtimestamp(float(t), timezone.utc) for t, _ in s["values"]]
                values = [float(v) for _, v in s["values"]]
                series.append((legend(target.get("legendFormat", ""), s["metric"]), times, values))
        series.sort(key=lambda s: s[0])
        if panel["type"] == "stat":
            stat(ax, panel, series, marks)
        else:
            timeseries(ax, panel, series, marks)
            ax.set_xlim(datetime.fromtimestamp(start, timezone.utc), datetime.fromtimestamp(end, timezone.utc))
        ax.set_title(panel["title"], color=TEXT, fontsize=9, loc="left", pad=4)
        # Inset so panels do not touch: shrink the axes inside their cell.
        box = ax.get_position()
        legend_room = 0 if panel["type"] == "stat" else 0.33
        # Graphs keep room on the left for their y labels.
        pad_left = 0.004 if panel["type"] == "stat" else 0.038
        cell_h = box.height
        ax.set_position([
            box.x0 + pad_left,
            box.y0 + cell_h * legend_room,
            box.width - pad_left - 0.006,
            cell_h * (1 - legend_room) - 0.012,
        ])
    fig.savefig(out, dpi=90, facecolor=BACKGROUND)
    plt.close(fig)


def when(text, now):
    if text.startswith("-"):
        amount, unit = float(text[1:-1]), text[-1]
        return now - amount * {"s": 1, "m": 60, "h": 3600}[unit]
    return float(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prometheus", required=True, help="e.g. http://127.0.0.1:9090")
    parser.add_argument("--dashboard", default=str(HERE / "dynacache.dashboard.json"))
    parser.add_argument("--start", default="-15m", help="unix time, or -15m / -1h before --end")
    parser.add_argument("--end", default=None, help="unix time (default: now)")
    parser.add_argument("--step", type=float, default=15)
    parser.add_argument("--rate-interval", default="1m", help="what $__rate_interval stands for")
    parser.add_argument("--title", default="dynacache")
    parser.add_argument("--mark", action="append", default=[],
                        help="START,END,LABEL (unix times): a shaded span, e.g. a fault")
    parser.add_argument("--out", default=str(HERE / "dashboard.png"))
    args = parser.parse_args()
    end = float(args.end) if args.end else time.time()
    start = when(args.start, end)
    marks = []
    for m in args.mark:
        a, b, label = m.split(",", 2)
        marks.append((float(a), float(b), label))
    render(args.prometheus, args.dashboard, start, end, args.step, args.out, args.rate_interval, args.title, marks)
    print(args.out)


if __name__ == "__main__":
    main()
