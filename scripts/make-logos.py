"""Draw the sandboxed kernels' logos into share/jupyter/kernels/python3-sandboxed/.

    python scripts/make-logos.py      (needs matplotlib, a test dependency)

A box (the sandbox) in Python's colours on a rounded square: the SVG is written
by hand from the same shapes that matplotlib fills for the two PNGs, so the
three agree. The files are committed; rerun this only to change them.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch, Polygon

OUT = Path(__file__).resolve().parent.parent / "share" / "jupyter" / "kernels" / "python3-sandboxed"
SIZE = 64
BACKGROUND = "#24527a"
# (points in a 64x64 box, y down as in SVG; fill)
FACES = [
    ([(32, 10), (53, 22), (32, 34), (11, 22)], "#ffd43b"),   # top
    ([(11, 22), (32, 34), (32, 57), (11, 45)], "#ffffff"),   # left
    ([(32, 34), (53, 22), (53, 45), (32, 57)], "#c9d8e6"),   # right
]
STROKE = 2


def svg() -> str:
    faces = "\n".join(
        f'  <polygon points="{" ".join(f"{x},{y}" for x, y in points)}" fill="{fill}" '
        f'stroke="{BACKGROUND}" stroke-width="{STROKE}" stroke-linejoin="round"/>'
        for points, fill in FACES)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{SIZE}" height="{SIZE}" '
            f'viewBox="0 0 {SIZE} {SIZE}">\n'
            f'  <title>Python 3 (sandboxed)</title>\n'
            f'  <rect width="{SIZE}" height="{SIZE}" rx="12" fill="{BACKGROUND}"/>\n'
            f"{faces}\n</svg>\n")


def png(pixels: int, path: Path) -> None:
    fig = plt.figure(figsize=(1, 1), dpi=pixels)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, SIZE)
    ax.set_ylim(SIZE, 0)
    ax.axis("off")
    ax.add_patch(FancyBboxPatch((0, 0), SIZE, SIZE, boxstyle="round,pad=0,rounding_size=12",
                                facecolor=BACKGROUND, edgecolor="none"))
    for points, fill in FACES:
        # the figure is one inch: SIZE units are 72 points
        ax.add_patch(Polygon(points, closed=True, facecolor=fill, edgecolor=BACKGROUND,
                             linewidth=STROKE * 72 / SIZE, joinstyle="round"))
    fig.savefig(path, dpi=pixels, transparent=True)
    plt.close(fig)


def main() -> None:
    (OUT / "logo-svg.svg").write_text(svg())
    png(32, OUT / "logo-32x32.png")
    png(64, OUT / "logo-64x64.png")


if __name__ == "__main__":
    main()
