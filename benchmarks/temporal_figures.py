"""benchmarks/temporal.py's figures: the curves (matplotlib) and the side-by-side strip of frames (PIL)."""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.common import pyplot

STILL = "still"
LABELS = {
    "input": "input",
    "no_feedback": "no feedback",
    "in_place": "fb in place",
    "warped_feedback": "fb warped",
    "warped_noise": "noise warped",
    "both": "both",
    "steps": "fb at steps",
    "both_steps": "both, steps",
    "both_motion": "steps+motion",
    "image": "image fb",
    "both_image": "steps+image",
}


def save_strip(outputs: dict[str, list[np.ndarray]], path: str, rows: int = 3, tile: int = 128) -> None:
    """Frames of one clip side by side: input, no feedback, feedback in place, both, both at the steps
    (and with image feedback, when run); `rows` moments down the clip, each frame scaled to at most
    `tile` px a side (the file stays small)."""
    from PIL import Image, ImageDraw

    columns = ("input", "no_feedback", "in_place", "both", "both_steps", "both_image")
    columns = tuple(c for c in columns if c in outputs)
    n = len(outputs["input"])
    picks = sorted({min(n - 1, max(1, round(n * (i + 1) / (rows + 1)))) for i in range(rows)})
    h, w = outputs["input"][0].shape[:2]
    scale = min(1.0, tile / max(h, w))
    h, w = max(1, round(h * scale)), max(1, round(w * scale))
    label = 18
    canvas = Image.new("RGB", (w * len(columns), label + h * len(picks)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, column in enumerate(columns):
        draw.text((j * w + 4, 3), LABELS[column], fill="black")
        for i, t in enumerate(picks):
            frame = Image.fromarray(outputs[column][t]).resize((w, h), Image.Resampling.BOX)
            canvas.paste(frame, (j * w, label + i * h))
    canvas.save(path, optimize=True)


def plot(curves: dict[str, dict[str, dict[str, list[float]]]], report: dict[str, Any], path: str) -> None:
    plt = pyplot()
    from matplotlib import ticker

    names = list(curves)
    fig, axes = plt.subplots(len(names), 1, figsize=(9, 2.6 * len(names)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        measure = "change" if name == STILL else "warp_error"
        for key, values in curves[name][measure].items():
            style = {"color": "grey", "ls": "--"} if key == "input" else {}
            ax.plot(range(1, len(values) + 1), values, label=LABELS[key], lw=1.1, **style)
        ax.set_ylabel("mean |diff| (0-255)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{name}: {measure.replace('_', ' ')}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=3)
    axes[-1, 0].set_xlabel("frame t (compared with frame t-1)")
    axes[-1, 0].xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    fig.suptitle(
        f"{report['model']}, {report['width']}x{report['height']}, {report['steps']} steps, "
        f"strength {report['strength']}, feedback {report['feedback']:g}\n{report['note']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
