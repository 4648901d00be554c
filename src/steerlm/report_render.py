"""Report building blocks, rendered twice: Markdown (report.md) and standalone HTML (report.html).

A report is a list of blocks::

    ("h", level, text) | ("p", text) | ("table", header, rows) | ("img", path, caption) | ("pre", text)

Images are PNGs next to the report: linked from Markdown, embedded (base64) in HTML so the file can be
mailed on its own. Plots use matplotlib's Agg canvas (no display needed) and are written atomically.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Optional, Sequence

CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;vertical-align:top;"
       "text-align:left;font-size:14px}th{background:#f3f3f3}td.text{white-space:pre-wrap;max-width:480px}"
       "img{max-width:100%}pre{background:#f6f6f6;padding:8px;overflow-x:auto}")


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.{digits}f}" if v == 0 or 1e-2 <= abs(v) < 1e5 else f"{v:.3g}"
    return str(v)


def _md_cell(v) -> str:
    return fmt(v).replace("|", "\\|").replace("\n", "<br>")


def to_markdown(blocks: Sequence[tuple], base: Path) -> str:
    out = []
    for b in blocks:
        if b[0] == "h":
            out.append(f"{'#' * b[1]} {b[2]}")
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "pre":
            out.append(f"```\n{b[1]}\n```")
        elif b[0] == "img":
            out.append(f"![{b[2]}]({os.path.relpath(b[1], base)})")
        elif b[0] == "table":
            header, rows = b[1], b[2]
            lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def to_html(blocks: Sequence[tuple], title: str) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body>"]
    for b in blocks:
        if b[0] == "h":
            out.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            out.append(f"<p>{html.escape(b[1])}</p>")
        elif b[0] == "pre":
            out.append(f"<pre>{html.escape(b[1])}</pre>")
        elif b[0] == "img":
            data = base64.b64encode(Path(b[1]).read_bytes()).decode()
            out.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(b[2])}'>"
                       f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
        elif b[0] == "table":
            head = "".join(f"<th>{html.escape(fmt(h))}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(
                f"<td{' class=text' if isinstance(c, str) and len(c) > 40 else ''}>{html.escape(fmt(c))}</td>"
                for c in row) + "</tr>" for row in b[2])
            out.append(f"<table><tr>{head}</tr>{body}</table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ===== plots =====================================================================================
def save_figure(fig, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    os.replace(tmp, path)


def plot_loss_curve(train: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]], path: Path,
                    title: str, ylabel: str = "loss (mean NLL per trained token)") -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.4), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    if train:
        ax.plot(*zip(*train), marker=".", label="per step")
    if val:
        ax.plot(*zip(*val), "s", color="C3", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_panels(panels: dict[str, Sequence[tuple[int, float]]], path: Path, title: str, xlabel: str = "step",
                bands: Optional[dict[str, Sequence[float]]] = None) -> None:
    """One line panel per curve, side by side; `bands[name]`: a ± half-width per point (e.g. a std)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6 * len(panels), 3.2), layout="constrained")
    fig.suptitle(title)
    for k, (name, points) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), k + 1)
        if points:
            x, y = zip(*points)
            ax.plot(x, y, marker=".")
            if bands and name in bands:
                ax.fill_between(x, [a - b for a, b in zip(y, bands[name])], [a + b for a, b in zip(y, bands[name])],
                                alpha=0.2)
        ax.set_xlabel(xlabel)
        ax.set_title(name, fontsize=10)
    save_figure(fig, path)


def plot_intervals(curves: dict[str, Sequence[tuple]], path: Path, title: str, xlabel: str, ylabel: str) -> None:
    """One line per name through (x, value) with a shaded (lo, hi) band, and the zero line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for name, pts in curves.items():
        x, y = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(x, y, marker="o", label=name)
        band = [(p[0], p[2], p[3]) for p in pts if p[2] is not None and p[3] is not None]
        if band:
            ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band], alpha=0.15)
    ax.axhline(0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_distributions(counts: dict[str, list[int]], levels: Sequence[int], path: Path) -> None:
    """One bar panel per attribute: how many labeled turns got each level."""
    import math

    from matplotlib.figure import Figure

    cols = min(3, len(counts))
    rows = math.ceil(len(counts) / cols)
    fig = Figure(figsize=(3.6 * cols, 2.6 * rows), layout="constrained")
    for k, (name, c) in enumerate(counts.items()):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.bar(list(levels), c, color="C0")
        ax.set_xticks(list(levels))
        ax.set_title(name)
        ax.set_xlabel("label")
    save_figure(fig, path)
