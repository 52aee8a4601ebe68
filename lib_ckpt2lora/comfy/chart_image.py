"""The rank/energy chart as an image (ComfyUI's IMAGE), drawn with Pillow.

The same chart as the tab's SVG (``ui/chart.py``): one bar per group for its mean rank
(left axis), a line through each group's captured energy (right axis). ComfyUI ships
Pillow and numpy; an IMAGE is a float tensor [batch, height, width, 3] in 0..1.
"""

from __future__ import annotations

from ..ui.chart import _nice as nice_scale

BACKGROUND, GRID, TEXT = (255, 255, 255), (225, 225, 225), (40, 40, 40)
BAR, ENERGY = (90, 140, 220), (230, 120, 40)
STEP, LEFT, RIGHT, TOP, PLOT_H, LABEL_H = 72, 48, 52, 28, 200, 44
LABEL_CHARS = 11  # what fits under a bar in Pillow's default font


def chart_pixels(report: dict):
    """The chart of ``Report.to_dict()`` as a uint8 numpy array [height, width, 3]."""
    import numpy as np
    from PIL import Image, ImageDraw

    groups = report.get("groups", [])
    width = LEFT + RIGHT + STEP * max(1, len(groups))
    height = TOP + PLOT_H + LABEL_H
    image = Image.new("RGB", (max(width, 320), height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    if not groups:
        draw.text((LEFT, TOP), "No LoRA layers to chart.", fill=TEXT)
        return np.asarray(image, dtype=np.uint8)
    scale_top = nice_scale(max(1.0, max(float(g["rank"]) for g in groups)))
    e_lo = max(0.0, int(min(0.9, min(float(g["energy"]) for g in groups)) * 20) / 20)  # floor to 5 %
    bottom = TOP + PLOT_H
    draw.text((LEFT, 6), "bars: mean rank    line: captured energy", fill=TEXT)
    for i in range(5):  # grid and both axes
        y = bottom - PLOT_H * i / 4
        draw.line([(LEFT, y), (width - RIGHT, y)], fill=GRID)
        draw.text((4, y - 6), f"{scale_top * i / 4:g}", fill=TEXT)
        draw.text((width - RIGHT + 4, y - 6), f"{100 * (e_lo + (1 - e_lo) * i / 4):.0f}%", fill=TEXT)
    points = []
    for index, group in enumerate(groups):
        x = LEFT + STEP * index
        bar = PLOT_H * float(group["rank"]) / scale_top
        draw.rectangle([x + 6, bottom - bar, x + STEP - 6, bottom], fill=BAR)
        energy = min(1.0, max(e_lo, float(group["energy"])))
        points.append((x + STEP / 2, bottom - PLOT_H * (energy - e_lo) / max(1e-9, 1 - e_lo)))
        draw.text((x + 4, bottom + 4), str(group["level"])[:LABEL_CHARS], fill=TEXT)
        draw.text((x + 4, bottom + 18), str(group["type"])[:LABEL_CHARS], fill=TEXT)
    if len(points) > 1:
        draw.line(points, fill=ENERGY, width=2)
    for x, y in points:
        draw.ellipse([x - 3.5, y - 3.5, x + 3.5, y + 3.5], fill=ENERGY)
    return np.asarray(image, dtype=np.uint8)


def chart_image(report: dict):
    """The chart as ComfyUI's IMAGE: float32 torch tensor [1, height, width, 3] in 0..1."""
    import torch

    return torch.from_numpy(chart_pixels(report).astype("float32") / 255.0).unsqueeze(0)
