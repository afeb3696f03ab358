"""The book's one plotting style and the recurring figure kinds.

- :func:`style` -- seaborn's theme with the book's palette and sizes (call once per chapter).
- :func:`band`  -- curves over steps with a mean line and a +-1 sd band over seeds, one per method.
- :func:`bars`  -- method-vs-baseline bars with the seeds drawn as dots.
- :func:`frontier` -- one line per method through its settings (e.g. learning rates), y against x, means
  over seeds; optional rings on a chosen subset.

Data go in as tidy pandas frames (one row per observation), as seaborn likes them.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

PALETTE = "colorblind"


def style() -> None:
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE,
                  rc={"figure.figsize": (6.4, 3.6), "figure.dpi": 110, "axes.titleweight": "bold",
                      "axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False})


def band(df, *, x: str, y: str, hue: str, ax=None, seed_col: str = "seed", title: str | None = None,
         ylabel: str | None = None, xlabel: str | None = None, hue_order=None, smooth: int = 1):
    """Mean over ``seed_col`` as a line and +-1 sd as a band, one colour per ``hue`` value.

    ``smooth`` > 1 applies a trailing moving average of that many points within each seed first.
    """
    ax = ax or plt.gca()
    order = hue_order or list(dict.fromkeys(df[hue]))
    colors = sns.color_palette(PALETTE, len(order))
    for color, name in zip(colors, order):
        sub = df[df[hue] == name]
        table = sub.pivot_table(index=x, columns=seed_col, values=y)
        if smooth > 1:
            table = table.rolling(smooth, min_periods=1).mean()
        mean, sd = table.mean(axis=1), table.std(axis=1, ddof=0)
        ax.plot(table.index, mean, color=color, label=f"{name} (n={table.shape[1]})")
        if table.shape[1] > 1:
            ax.fill_between(table.index, mean - sd, mean + sd, color=color, alpha=0.2, linewidth=0)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    if title:
        ax.set_title(title)
    ax.legend()
    return ax


def bars(df, *, x: str, y: str, ax=None, order=None, title: str | None = None, ylabel: str | None = None,
         annotate: bool = True, fmt: str = "{:.3f}"):
    """Mean of ``y`` per ``x`` as bars with +-1 sd error bars and each observation (seed) as a dot."""
    ax = ax or plt.gca()
    order = order or list(dict.fromkeys(df[x]))
    sns.barplot(df, x=x, y=y, order=order, errorbar="sd", ax=ax, hue=x, legend=False, alpha=0.8,
                palette=PALETTE)
    sns.stripplot(df, x=x, y=y, order=order, ax=ax, color="black", size=4, jitter=0.15)
    if annotate:
        for i, name in enumerate(order):
            m = float(np.mean(df[df[x] == name][y]))
            ax.annotate(fmt.format(m), (i, m), ha="center", va="bottom", xytext=(0, 3),
                        textcoords="offset points", fontsize=9)
    ax.set_xlabel("")
    ax.set_ylabel(ylabel or y)
    if title:
        ax.set_title(title)
    return ax


def show_source(*objs):
    """Display the source of functions/classes from rwlib as a highlighted code block (the chapter shows the
    method straight from the library, so text and code cannot drift apart)."""
    import inspect

    from IPython.display import Markdown

    code = "\n\n".join(inspect.getsource(o).rstrip() for o in objs)
    return Markdown(f"```python\n{code}\n```")


def frontier(df, *, x: str, y: str, hue: str, along: str, ax=None, ring=None, ring_label: str = "",
             title: str | None = None, xlabel: str | None = None, ylabel: str | None = None):
    """Means over seeds of ``y`` against ``x``, one line per ``hue`` value through its ``along`` values in
    the frame's order (e.g. a learning-rate grid: the learning/forgetting trade-off); ``ring`` is a frame of
    the same columns whose per-``hue`` means are circled (e.g. the paper's setting)."""
    ax = ax or plt.gca()
    mean = df.groupby([hue, along], sort=False)[[x, y]].mean().reset_index()
    for name, d in mean.groupby(hue, sort=False):
        ax.plot(d[x], d[y], marker="o", ls="-" if len(d) > 1 else "", label=name)
    if ring is not None:
        pm = ring.groupby(hue)[[x, y]].mean()
        ax.scatter(pm[x], pm[y], s=160, facecolors="none", edgecolors="k", label=ring_label)
    ax.set(xlabel=xlabel or x, ylabel=ylabel or y)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return ax
