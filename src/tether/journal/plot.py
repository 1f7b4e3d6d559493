"""Usage as a picture (``tether usage --plot FILE``): two panels, one colour per device key.

- **utilisation over time**: the busy fraction of each key's devices in equal slices of the window
  (:meth:`JournalReader.timeline <tether.journal.JournalReader.timeline>`), 0..100 %;
- **wait-time distribution**: per key, the share of requests (grants and requests that timed out) that
  waited at most x seconds (an empirical CDF), x logarithmic when the waits span more than 20x, with
  p50 and p95 in the legend.

``.svg`` is written with the standard library alone, as ``tether bench --plot`` does; other suffixes go
through matplotlib (``pip install 'tether[plot]'``), imported only then.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from .usage import percentile

__all__ = ["check_plot_path", "render_svg", "write_usage_plot"]

#: Okabe-Ito colours, as tether bench's plots
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000")
LOG_RATIO = 20.0
_W, _PANEL_H, _LEFT, _RIGHT, _TOP, _GAP = 960.0, 260.0, 70.0, 220.0, 50.0, 80.0


def check_plot_path(path: str | os.PathLike[str]) -> None:
    """Raise :class:`~tether.errors.ConfigError` unless ``path``'s file type can be written (``.svg``
    always; others with matplotlib)."""
    from ..client.plot import check_plot_path as check

    check(path)


@dataclass(frozen=True, slots=True)
class _Axis:
    lo: float
    hi: float
    log: bool
    ticks: tuple[float, ...]

    def at(self, value: float) -> float:
        """0 at ``lo`` to 1 at ``hi``."""
        if self.log:
            value = max(value, self.lo)
            return (math.log10(value) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        return (value - self.lo) / (self.hi - self.lo)


def _nice(x: float) -> float:
    exp = math.floor(math.log10(x))
    f = x / 10**exp
    return (1 if f < 1.5 else 2 if f < 3.5 else 5 if f < 7.5 else 10) * 10.0**exp


def _wait_axis(values: Sequence[float]) -> _Axis:
    positive = [v for v in values if v > 0]
    hi = max(values, default=1.0) or 1.0
    if positive and hi / min(positive) > LOG_RATIO:
        a, b = math.floor(math.log10(min(positive))), math.ceil(math.log10(hi))
        return _Axis(10.0**a, 10.0**b, True, tuple(10.0**e for e in range(a, b + 1)))
    step = _nice(hi / 5)
    end = math.ceil(hi / step) * step
    return _Axis(0.0, end, False, tuple(i * step for i in range(round(end / step) + 1)))


def _time_ticks(start: float, end: float) -> list[tuple[float, str]]:
    span = max(end - start, 1.0)
    fmt = "%H:%M" if span <= 86400 else "%m-%d %H:%M" if span <= 4 * 86400 else "%Y-%m-%d"
    return [(start + span * i / 5, dt.datetime.fromtimestamp(start + span * i / 5).strftime(fmt)) for i in range(6)]


def _seconds(value: float) -> str:
    if value < 1:
        return f"{value * 1000:.0f} ms" if value >= 0.001 or value == 0 else f"{value * 1000:.2f} ms"
    return f"{value:.3g} s" if value < 120 else f"{value / 60:.3g} min"


def _legend_waits(values: Sequence[float]) -> str:
    return f"n={len(values)}, p50 {_seconds(percentile(values, 50))}, p95 {_seconds(percentile(values, 95))}"


def _el(tag: str, attrs: dict[str, object], text: str | None = None) -> str:
    body = " ".join(f"{k.replace('_', '-')}={quoteattr(str(v))}" for k, v in attrs.items())
    return f"<{tag} {body}/>" if text is None else f"<{tag} {body}>{escape(text)}</{tag}>"


def render_svg(
    start: float,
    end: float,
    util: dict[str, list[float]],
    waits: dict[str, list[float]],
    title: str = "tether usage",
) -> str:
    """The two panels as an SVG document (see the module's docstring)."""
    keys = sorted(set(util) | set(waits))
    color = {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(keys)}
    width = _W - _LEFT - _RIGHT
    out = [_el("text", {"x": 12, "y": 28, "font_size": 18, "font_weight": "bold"}, title)]

    def panel(top: float, heading: str, xlabel: str) -> None:
        out.append(_el("text", {"x": _LEFT, "y": top - 10, "font_size": 14, "font_weight": "bold"}, heading))
        out.append(_el("rect", {"x": _LEFT, "y": top, "width": width, "height": _PANEL_H, "fill": "none",
                                "stroke": "#999"}))  # fmt: skip
        for pct in (0, 25, 50, 75, 100):
            y = top + _PANEL_H * (1 - pct / 100)
            out.append(_el("line", {"x1": _LEFT, "x2": _LEFT + width, "y1": y, "y2": y, "stroke": "#e5e5e5"}))
            out.append(_el("text", {"x": _LEFT - 6, "y": y + 4, "font_size": 11, "text_anchor": "end"}, f"{pct}%"))
        out.append(_el("text", {"x": _LEFT + width / 2, "y": top + _PANEL_H + 36, "font_size": 12,
                                "text_anchor": "middle"}, xlabel))  # fmt: skip

    def xtick(top: float, x: float, label: str) -> None:
        out.append(_el("line", {"x1": x, "x2": x, "y1": top, "y2": top + _PANEL_H, "stroke": "#eee"}))
        out.append(_el("text", {"x": x, "y": top + _PANEL_H + 16, "font_size": 11, "text_anchor": "middle"}, label))

    def legend(top: float, i: int, key: str, text: str) -> None:
        y = top + 14 + 34 * i
        x = _LEFT + width + 16
        out.append(_el("rect", {"x": x, "y": y - 9, "width": 12, "height": 12, "fill": color[key]}))
        out.append(_el("text", {"x": x + 18, "y": y + 1, "font_size": 12}, key or "(no key)"))
        out.append(_el("text", {"x": x + 18, "y": y + 16, "font_size": 10, "fill": "#555"}, text))

    top = _TOP + 20
    panel(top, "Utilisation over time per key (busy fraction of its devices)", "time")
    for t, label in _time_ticks(start, end):
        xtick(top, _LEFT + width * (t - start) / max(end - start, 1e-9), label)
    for i, (key, row) in enumerate(sorted(util.items())):
        n = len(row)
        points = " ".join(
            f"{_LEFT + width * (j + 0.5) / n:.1f},{top + _PANEL_H * (1 - min(v, 1.0)):.1f}" for j, v in enumerate(row)
        )
        out.append(_el("polyline", {"points": points, "fill": "none", "stroke": color[key], "stroke_width": 2}))
        mean = sum(row) / n if n else 0.0
        legend(top, i, key, f"mean {100 * mean:.1f}%")
    if not util:
        out.append(_el("text", {"x": _LEFT + width / 2, "y": top + _PANEL_H / 2, "text_anchor": "middle"},
                       "no sessions in this window"))  # fmt: skip

    top += _PANEL_H + _GAP
    axis = _wait_axis([v for vs in waits.values() for v in vs])
    panel(
        top,
        "Wait-time distribution: share of requests that waited at most x",
        "wait" + (" (log scale)" if axis.log else ""),
    )
    for t in axis.ticks:
        xtick(top, _LEFT + width * axis.at(t), _seconds(t))
    for i, (key, values) in enumerate(sorted(waits.items())):
        n, pts = len(values), [f"{_LEFT:.1f},{top + _PANEL_H:.1f}"]
        for j, v in enumerate(values):
            x = _LEFT + width * axis.at(v)
            pts += [f"{x:.1f},{top + _PANEL_H * (1 - j / n):.1f}", f"{x:.1f},{top + _PANEL_H * (1 - (j + 1) / n):.1f}"]
        pts.append(f"{_LEFT + width:.1f},{top:.1f}")
        out.append(_el("polyline", {"points": " ".join(pts), "fill": "none", "stroke": color[key], "stroke_width": 2}))
        legend(top, i, key, _legend_waits(values))
    if not waits:
        out.append(_el("text", {"x": _LEFT + width / 2, "y": top + _PANEL_H / 2, "text_anchor": "middle"},
                       "no waits in this window"))  # fmt: skip
    height = top + _PANEL_H + 50
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {_W:.0f} {height:.0f}" font-family="sans-serif">'
    )
    return "\n".join([head, _el("rect", {"width": "100%", "height": "100%", "fill": "white"}), *out, "</svg>\n"])


def write_usage_plot(
    path: str | os.PathLike[str],
    start: float,
    end: float,
    *,
    util: dict[str, list[float]],
    waits: dict[str, list[float]],
    title: str = "tether usage",
) -> None:
    """Draw the two panels to ``path``: ``.svg`` by hand, other types with matplotlib. Raises
    :class:`~tether.errors.ConfigError` for a type that cannot be written, OSError when the file cannot be."""
    check_plot_path(path)
    if Path(path).suffix.lower() == ".svg":
        Path(path).write_text(render_svg(start, end, util, waits, title), encoding="utf-8")
        return
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 8))
    top, bottom = fig.subplots(2, 1)
    keys = sorted(set(util) | set(waits))
    color = {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(keys)}
    for key, row in sorted(util.items()):
        n = len(row)
        times = [dt.datetime.fromtimestamp(start + (end - start) * (j + 0.5) / n) for j in range(n)]
        mean = sum(row) / n if n else 0.0
        top.plot(times, [100 * v for v in row], color=color[key], linewidth=2, label=f"{key} (mean {100 * mean:.1f}%)")
    top.set_ylim(0, 100)
    top.set_ylabel("busy, % of the key's devices")
    top.set_title("Utilisation over time per key", loc="left", fontweight="bold")
    axis = _wait_axis([v for vs in waits.values() for v in vs])
    for key, values in sorted(waits.items()):
        n = len(values)
        shares = [100 * (j + 1) / n for j in range(n)]
        xs = [max(v, axis.lo) for v in values] if axis.log else list(values)
        bottom.step(xs, shares, where="post", color=color[key], linewidth=2, label=f"{key} ({_legend_waits(values)})")
    if axis.log:
        bottom.set_xscale("log")
    bottom.set_xlim(axis.lo, axis.hi)
    bottom.set_ylim(0, 100)
    bottom.set_xlabel("wait, seconds")
    bottom.set_ylabel("% of requests")
    bottom.set_title("Wait-time distribution (share that waited at most x)", loc="left", fontweight="bold")
    for ax, empty in ((top, "no sessions in this window"), (bottom, "no waits in this window")):
        ax.grid(color="#e5e5e5")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center")
    fig.suptitle(title, x=0.01, ha="left", fontweight="bold")
    fig.tight_layout()
    fig.savefig(path, dpi=120, facecolor="white")
