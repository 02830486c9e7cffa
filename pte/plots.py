"""PNG line plots, the one place pte draws: headless (Agg) and written atomically (:mod:`pte.files`), so a crash
never leaves half an image. Callers say what to draw (:class:`Line`, :class:`Panel`); this module says how."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pte.files import write_atomic


@dataclass
class Line:
    label: str
    x: list
    y: list
    yerr: tuple[list, list] | None = None  # (below, above) each point: drawn as error bars


@dataclass
class Panel:
    lines: list[Line]
    xlabel: str = ""
    ylabel: str = ""
    title: str = ""
    title_size: float | None = None
    log2_x: bool = False
    ylim: tuple[float, float] | None = None
    xticks: list[str] = field(default_factory=list)  # categorical axis: these labels at x = 0, 1, ...
    marker: str = "o"


def _draw(ax, panel: Panel) -> None:
    for line in panel.lines:
        if line.yerr is not None:
            ax.errorbar(line.x, line.y, yerr=[list(e) for e in line.yerr], marker=panel.marker, capsize=4,
                        label=line.label)
        else:
            ax.plot(line.x, line.y, marker=panel.marker, label=line.label)
    if panel.xticks:
        ax.set_xticks(range(len(panel.xticks)), panel.xticks)
    if panel.log2_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(panel.xlabel)
    if panel.ylabel:
        ax.set_ylabel(panel.ylabel)
    if panel.ylim is not None:
        ax.set_ylim(*panel.ylim)
    if panel.title:
        ax.set_title(panel.title, **({} if panel.title_size is None else {"fontsize": panel.title_size}))
    ax.grid(alpha=0.3)
    ax.legend()


def figure(path: str | Path, panels: list[Panel], *, size: tuple[float, float], dpi: int = 100) -> Path:
    """Panels side by side in one PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=size, squeeze=False)
    try:
        for ax, panel in zip(axes[0], panels):
            _draw(ax, panel)
        fig.tight_layout()
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)
    return Path(path)


def line_plot(path: str | Path, lines: list[Line], *, xlabel: str, ylabel: str = "", title: str = "",
              size: tuple[float, float] = (6, 4), dpi: int = 100, **panel) -> Path:
    """One panel of lines (``panel``: the other :class:`Panel` fields) -> ``path``."""
    return figure(path, [Panel(lines, xlabel, ylabel, title, **panel)], size=size, dpi=dpi)
