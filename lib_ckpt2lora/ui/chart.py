"""The report as a table (the original's columns) and as an SVG chart. No gradio here."""

from __future__ import annotations

import html

COLUMNS = ["Level", "Type", "n", "rank", "S_max", "S_min", "ratio", "energy"]


def _s(value: float) -> str:
    return f"{value:.2f}" if value == 0 or abs(value) >= 0.01 else f"{value:.1e}"


def table_rows(report: dict) -> list[list[str]]:
    """One row per group, then the total, formatted like the original's summary."""
    rows = []
    for group in report.get("groups", []):
        rows.append(
            [
                group["level"],
                group["type"],
                str(group["n"]),
                f"{group['rank']:.1f}",
                _s(group["s_max"]),
                _s(group["s_min"]),
                f"{group['ratio']:.1f}x",
                f"{100 * group['energy']:.1f}%",
            ]
        )
    total = report.get("total") or {}
    if total.get("n"):
        rows.append(["Total", "ALL", str(total["n"]), f"{total['rank']:.1f}", "", "", "", f"{100 * total['energy']:.1f}%"])
    return rows


def chart_svg(report: dict) -> str:
    """Bars: mean rank per group (left axis); dots and line: captured energy (right axis)."""
    groups = report.get("groups", [])
    if not groups:
        return "<p class='ckpt2lora-chart-empty'>No LoRA layers to chart.</p>"
    step, left, right, top, plot_h, label_h = 34, 44, 48, 26, 180, 92
    width = left + right + step * len(groups)
    height = top + plot_h + label_h
    rank_max = max(1.0, max(float(g["rank"]) for g in groups))
    scale_top = _nice(rank_max)
    e_lo = min(0.9, min(float(g["energy"]) for g in groups))
    e_lo = max(0.0, int(e_lo * 20) / 20)  # floor to 5 %
    out = [
        f"<svg class='ckpt2lora-chart-svg' viewBox='0 0 {width} {height}' width='{width}' height='{height}' "
        "xmlns='http://www.w3.org/2000/svg' role='img' aria-label='Rank and captured energy per group'>",
        f"<text x='{left}' y='14' class='ckpt2lora-legend'><tspan class='ckpt2lora-rank-key'>&#9632;</tspan> mean rank"
        f"  <tspan class='ckpt2lora-energy-key'>&#9679;</tspan> captured energy</text>",
    ]
    for i in range(5):  # grid and axes
        y = top + plot_h - plot_h * i / 4
        out.append(f"<line x1='{left}' x2='{width - right}' y1='{y:.1f}' y2='{y:.1f}' class='ckpt2lora-grid'/>")
        out.append(f"<text x='{left - 4}' y='{y + 4:.1f}' text-anchor='end' class='ckpt2lora-axis'>{scale_top * i / 4:g}</text>")
        energy = e_lo + (1 - e_lo) * i / 4
        out.append(f"<text x='{width - right + 4}' y='{y + 4:.1f}' class='ckpt2lora-axis'>{100 * energy:.0f}%</text>")
    points = []
    for index, group in enumerate(groups):
        x = left + step * index
        rank = float(group["rank"])
        bar = plot_h * rank / scale_top
        label = html.escape(f"{group['level']} {group['type']}")
        tip = html.escape(
            f"{group['level']} {group['type']}: n={group['n']}, rank {rank:.1f}, energy {100 * group['energy']:.1f}%"
        )
        out.append(
            f"<rect x='{x + 5}' y='{top + plot_h - bar:.1f}' width='{step - 10}' height='{bar:.1f}' "
            f"class='ckpt2lora-bar'><title>{tip}</title></rect>"
        )
        energy = min(1.0, max(e_lo, float(group["energy"])))
        y = top + plot_h - plot_h * (energy - e_lo) / max(1e-9, 1 - e_lo)
        points.append((x + step / 2, y, tip))
        cx, cy = x + step / 2, top + plot_h + 8
        out.append(
            f"<text x='{cx:.1f}' y='{cy:.1f}' transform='rotate(55 {cx:.1f} {cy:.1f})' class='ckpt2lora-label'>{label}</text>"
        )
    out.append(
        "<polyline class='ckpt2lora-energy' fill='none' points='" + " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in points) + "'/>"
    )
    for x, y, tip in points:
        out.append(f"<circle cx='{x:.1f}' cy='{y:.1f}' r='3.5' class='ckpt2lora-dot'><title>{tip}</title></circle>")
    out.append("</svg>")
    return "<div class='ckpt2lora-chart-wrap'>" + "".join(out) + "</div>"


def _nice(value: float) -> float:
    for candidate in (1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 40, 50, 64, 80, 100, 128, 160, 200, 256, 320, 400, 512, 640, 800, 1024):
        if value <= candidate:
            return float(candidate)
    return float(value)


def human_size(size: int) -> str:
    """Decimal units (MB = 10^6 bytes), the same MB as the Target size field."""
    value = float(size)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"
