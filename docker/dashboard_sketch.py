"""Draw a sketch of the Grafana dashboard as an SVG, from real Prometheus data.

Grafana cannot be installed on the machines this project is built on, so the README's picture of the
dashboard is not a Grafana screenshot. This script draws one honestly: it reads the panel layout and the
PromQL queries from docker/grafana/dashboards/casa-live.json, runs every query against a real Prometheus
(`/api/v1/query_range`, Grafana's variables replaced as Grafana would), and draws the answers with the
same grid, titles, units and thresholds. The picture says that it is a sketch.

    python docker/dashboard_sketch.py --prometheus http://127.0.0.1:9090 --minutes 10 \
        --out docs/images/dashboard-sketch.svg

Standard library only.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import urllib.parse
import urllib.request
from html import escape
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parent / "grafana" / "dashboards" / "casa-live.json"
COLORS = ["#73BF69", "#F2CC0C", "#5794F2", "#FF9830", "#F2495C", "#B877D9", "#8AB8FF", "#FFB357"]
COL = 50  # px per grid column (24 columns)
ROW = 30  # px per grid row
PAD = 6
BANNER = 64


def query_range(base: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{base}/api/v1/query_range?{params}", timeout=30) as response:
        body = json.load(response)
    if body["status"] != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def fmt(value: float, unit: str) -> str:
    if value is None or math.isnan(value):
        return "no data"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "percentunit":
        return f"{value * 100:.2f}%"
    if abs(value) >= 1000:
        return f"{value / 1000:.1f}k"
    return f"{value:.2f}".rstrip("0").rstrip(".") if value % 1 else f"{value:.0f}"


def nice_max(value: float) -> float:
    if value <= 0 or math.isnan(value):
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for m in (1, 2, 2.5, 5, 10):
        if value <= m * exp:
            return m * exp
    return 10 * exp


def legend(fmt_str: str, labels: dict) -> str:
    out = fmt_str
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out


def substitute(expr: str, rate_interval: str) -> str:
    return expr.replace("$__rate_interval", rate_interval).replace("$instance", ".*")


def draw(base: str, minutes: float, rate_interval: str, end: float | None) -> str:
    dashboard = json.loads(DASHBOARD.read_text())
    end = end or time.time()
    start = end - minutes * 60
    step = max(1.0, minutes * 60 / 120)
    panels = dashboard["panels"]
    height = BANNER + max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels) * ROW + PAD
    width = 24 * COL
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif">',
        f'<rect width="{width}" height="{height}" fill="#111217"/>',
        f'<rect x="{PAD}" y="{PAD}" width="{width - 2 * PAD}" height="{BANNER - 2 * PAD}" rx="4" '
        'fill="#3d2a00" stroke="#F2CC0C"/>',
        f'<text x="{PAD * 3}" y="{PAD + 22}" fill="#F2CC0C" font-size="16" font-weight="bold">'
        f"SKETCH, not a Grafana screenshot: dashboard &quot;{escape(dashboard['title'])}&quot;</text>",
        f'<text x="{PAD * 3}" y="{PAD + 42}" fill="#d8d9da" font-size="12">'
        "Layout and PromQL from docker/grafana/dashboards/casa-live.json; data from a real Prometheus "
        f"scraping casa serve, last {minutes:g} min, drawn by docker/dashboard_sketch.py.</text>",
    ]
    for panel in panels:
        g = panel["gridPos"]
        x, y = g["x"] * COL + PAD, BANNER + g["y"] * ROW + PAD / 2
        w, h = g["w"] * COL - PAD, g["h"] * ROW - PAD
        if panel["type"] == "row":
            svg.append(
                f'<text x="{x}" y="{y + 20}" fill="#d8d9da" font-size="14" font-weight="bold">'
                f"{escape(panel['title'])}</text>"
            )
            continue
        defaults = panel["fieldConfig"]["defaults"]
        unit = defaults.get("unit", "short")
        svg.append(f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="3" fill="#181b1f" stroke="#2c3235"/>')
        svg.append(
            f'<text x="{x + 8}" y="{y + 17}" fill="#d8d9da" font-size="12">{escape(panel["title"])}</text>'
        )
        series = []
        for target in panel["targets"]:
            for result in query_range(base, substitute(target["expr"], rate_interval), start, end, step):
                points = [(float(t), float(v)) for t, v in result["values"]]
                series.append((legend(target["legendFormat"], result["metric"]), points))
        if panel["type"] == "stat":
            last = [p[-1][1] for _, p in series if p and not math.isnan(p[-1][1])]
            value = last[0] if last else float("nan")
            steps = defaults["thresholds"]["steps"]
            red = steps[-1]["value"] if len(steps) > 1 else None
            color = "#F2495C" if red is not None and value == value and value >= red else "#73BF69"
            svg.append(
                f'<text x="{x + w / 2}" y="{y + h / 2 + 16}" fill="{color}" font-size="28" font-weight="bold" '
                f'text-anchor="middle">{escape(fmt(value, unit))}</text>'
            )
            continue
        # timeseries: plot area, y axis from 0 to a round maximum, threshold dashed
        px, py, pw, ph = x + 48, y + 26, w - 58, h - 26 - 20 - 14 * 3
        values = [v for _, pts in series for _, v in pts if not math.isnan(v)]
        threshold = None
        if defaults.get("custom", {}).get("thresholdsStyle", {}).get("mode") == "dashed":
            threshold = defaults["thresholds"]["steps"][-1]["value"]
        top = nice_max(max(values + ([threshold] if threshold else []), default=0.0))
        for frac in (0, 0.5, 1):
            ly = py + ph * (1 - frac)
            svg.append(f'<line x1="{px}" y1="{ly}" x2="{px + pw}" y2="{ly}" stroke="#2c3235"/>')
            svg.append(
                f'<text x="{px - 4}" y="{ly + 4}" fill="#8e8e8e" font-size="10" text-anchor="end">'
                f"{escape(fmt(top * frac, unit))}</text>"
            )
        if threshold is not None:
            ty = py + ph * (1 - threshold / top)
            svg.append(
                f'<line x1="{px}" y1="{ty}" x2="{px + pw}" y2="{ty}" stroke="#F2495C" stroke-dasharray="6 4"/>'
            )
        if not values:
            svg.append(
                f'<text x="{px + pw / 2}" y="{py + ph / 2}" fill="#8e8e8e" font-size="12" '
                'text-anchor="middle">no data</text>'
            )
        # Series that stay at zero (an error code never seen) are drawn but left out of the legend,
        # which lists the others as Grafana's table legend does: last and max.
        shown = [k for k, (_, pts) in enumerate(series) if any(v > 0 for _, v in pts if not math.isnan(v))]
        for i, (_name, points) in enumerate(series):
            color = COLORS[i % len(COLORS)]
            path, pen = [], "M"
            for t, v in points:
                if math.isnan(v):
                    pen = "M"
                    continue
                path.append(f"{pen}{px + pw * (t - start) / (end - start):.1f},{py + ph * (1 - v / top):.1f}")
                pen = "L"
            if path:
                svg.append(f'<path d="{" ".join(path)}" fill="none" stroke="{color}" stroke-width="1.6"/>')
        for line, k in enumerate(shown[:3]):
            name, points = series[k]
            real = [v for _, v in points if not math.isnan(v)]
            ly = py + ph + 18 + 14 * line
            svg.append(
                f'<rect x="{px}" y="{ly - 8}" width="10" height="3" fill="{COLORS[k % len(COLORS)]}"/>'
            )
            svg.append(
                f'<text x="{px + 14}" y="{ly - 3}" fill="#c7d0d9" font-size="10">{escape(name)}: '
                f"last {escape(fmt(real[-1], unit))}, max {escape(fmt(max(real), unit))}</text>"
            )
        hidden = len(series) - len(shown[:3])
        if hidden:
            zero = len(series) - len(shown)
            svg.append(
                f'<text x="{px + pw}" y="{py + ph + 15}" fill="#8e8e8e" font-size="10" text-anchor="end">'
                f"+{hidden} more series ({zero} all zero)</text>"
            )
    svg.append("</svg>")
    return "\n".join(svg) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate-interval", default="30s", help="what Grafana's $__rate_interval stands for")
    parser.add_argument("--end", type=float, default=None, help="unix time of the right edge (default: now)")
    parser.add_argument("--out", type=Path, default=Path("docs/images/dashboard-sketch.svg"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(draw(args.prometheus.rstrip("/"), args.minutes, args.rate_interval, args.end))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
