"""Bench records as a picture: latency distributions per model and device.

Layout, the same in both renderers: a group per model (in the records' order), in it a row per device;
on a row every raw sample is a dot (jittered up and down, deterministically), a box from p25 to p75, the
median as a line, whiskers from min to max, the confidence interval of the median (``SampleStats.median_ci``,
95 % by default) shaded, and the median written at the row's end. One axis in milliseconds for every row:
linear with 1-2-5 ticks, logarithmic when max/min > 20. Records without samples are listed under the
axis with their error type.

``.svg`` is written here with the standard library alone; other suffixes (``.png``, ``.pdf``, ...) go
through matplotlib (``pip install 'tether[plot]'``), imported only then.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape, quoteattr

from ..errors import ConfigError
from .stats import percentile

if TYPE_CHECKING:
    from .bench import BenchRecord

__all__ = ["check_plot_path", "render_svg", "write_plot"]

#: Okabe-Ito colours (distinguishable with colour blindness), one per device
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000")
LOG_RATIO = 20.0
_FAIL_WIDTH, _FAIL_LINES = 130, 4  # characters per failure line (both renderers fit them), lines per failure
EXPLAIN = "dots: samples, box: p25-p75, line: median, whiskers: min-max, shaded: {ci} CI of the median"
_GOLDEN = 0.6180339887498949


@dataclass(frozen=True, slots=True)
class _Row:
    """One model on one device, in milliseconds."""

    model: str
    device: str
    color: str
    samples: tuple[float, ...]
    q1: float
    median: float
    q3: float
    low: float
    high: float
    ci: tuple[float, float]
    confidence: float


@dataclass(frozen=True, slots=True)
class _Axis:
    lo: float
    hi: float
    log: bool
    ticks: tuple[float, ...]

    def at(self, value: float) -> float:
        """Where ``value`` (ms) lies, 0 at ``lo`` to 1 at ``hi``."""
        if self.log:
            return (math.log10(value) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        return (value - self.lo) / (self.hi - self.lo)

    @property
    def label(self) -> str:
        return "latency, ms (log scale)" if self.log else "latency, ms"


@dataclass(frozen=True, slots=True)
class _Plan:
    groups: list[tuple[str, list[_Row]]]
    failed: list[list[str]]  # a failure's lines, wrapped
    axis: _Axis | None


def _nice(x: float) -> float:
    """1, 2 or 5 times a power of ten, near ``x`` (> 0)."""
    exp = math.floor(math.log10(x))
    f = x / 10**exp
    return (1 if f < 1.5 else 2 if f < 3.5 else 5 if f < 7.5 else 10) * 10.0**exp


def _axis(lo: float, hi: float) -> _Axis:
    if lo > 0 and hi / lo > LOG_RATIO:
        a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        mults = (1, 2, 5) if b - a <= 3 else (1,)
        ticks = tuple(m * 10.0**e for e in range(a, b + 1) for m in mults if m * 10.0**e <= 10.0**b)
        return _Axis(10.0**a, 10.0**b, True, ticks)
    step = _nice((hi - lo) / 5 if hi > lo else max(abs(hi) * 0.02, 1e-6))
    start, end = math.floor(lo / step) * step, math.ceil(hi / step) * step
    if end - start < step / 2:  # every sample equal, on a tick
        start, end = start - step, end + step
    digits = max(0, 1 - math.floor(math.log10(step)))
    ticks = tuple(round(start + i * step, digits) for i in range(round((end - start) / step) + 1))
    return _Axis(ticks[0], ticks[-1], False, ticks)


def _failed(record: BenchRecord) -> list[str]:
    error = record.error or {"type": "NoSamples", "message": "no samples"}
    if record.model == "*":  # the device's session itself failed (queue timeout, connection)
        who = "session" if record.device == "?" else f"session on {record.device}"
    else:
        who = f"{record.model} on {record.device}"
    text = f"{who}: {error.get('type', 'error')}"
    message = " ".join((error.get("message") or "").split())
    if message:
        text += f": {message}"
    return textwrap.wrap(text, _FAIL_WIDTH, max_lines=_FAIL_LINES, placeholder=" \u2026", subsequent_indent="  ")


def _plan(records: Sequence[BenchRecord]) -> _Plan:
    groups: dict[str, list[_Row]] = {}
    colors: dict[str, str] = {}
    failed = []
    for r in records:
        if r.stats is None or not r.samples:
            failed.append(_failed(r))
            continue
        color = colors.setdefault(r.device, PALETTE[len(colors) % len(PALETTE)])
        ms = tuple(s * 1e3 for s in r.samples)
        ordered = sorted(ms)
        s = r.stats
        groups.setdefault(r.model, []).append(
            _Row(
                r.model,
                r.device,
                color,
                ms,
                percentile(ordered, 25),
                s.median * 1e3,
                percentile(ordered, 75),
                ordered[0],
                ordered[-1],
                (s.median_ci[0] * 1e3, s.median_ci[1] * 1e3),
                s.confidence,
            )
        )
    rows = [row for group in groups.values() for row in group]
    axis = _axis(min(r.low for r in rows), max(r.high for r in rows)) if rows else None
    return _Plan(list(groups.items()), failed, axis)


def _jitter(i: int) -> float:
    """The ``i``-th sample's vertical offset in -0.5..0.5: evenly spread, the same on every run."""
    return (i * _GOLDEN) % 1.0 - 0.5


def _ms(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _tick(value: float) -> str:
    return f"{value:g}"


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def _percent(confidence: float) -> str:
    return f"{confidence * 100:g} %"


# -- SVG ----------------------------------------------------------------------------------------

_W, _LABEL_X, _X0, _X1 = 960, 24, 280, 860
_TOP, _GROUP_H, _ROW_H, _FAIL_H, _FAIL_LINE_H = 76, 28, 26, 18, 15
_FONT = "system-ui, -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif"


def _el(tag: str, attrs: dict[str, object], text: str | None = None) -> str:
    def value(v: object) -> str:
        return f"{round(v, 2):g}" if isinstance(v, float) else str(v)

    head = tag + "".join(f" {k}={quoteattr(value(v))}" for k, v in attrs.items())
    return f"<{head}/>" if text is None else f"<{head}>{escape(text)}</{tag}>"


def _svg_row(row: _Row, axis: _Axis, cy: float) -> list[str]:
    def x(v: float) -> float:
        return _X0 + (_X1 - _X0) * axis.at(v)

    c = row.color
    tip = (
        f"{row.model} on {row.device}: median {_ms(row.median)} ms, {_percent(row.confidence)} CI "
        f"{_ms(row.ci[0])}..{_ms(row.ci[1])}, p25..p75 {_ms(row.q1)}..{_ms(row.q3)}, "
        f"min {_ms(row.low)}, max {_ms(row.high)}, n={len(row.samples)}"
    )
    out = [
        f"<g {_attrs_text({'class': 'row', 'data-model': row.model, 'data-device': row.device})}>",
        _el("title", {}, tip),
        _el("text", {"class": "device", "x": _LABEL_X, "y": cy + 4, "font-size": 12}, _cut(row.device, 38)),
        _el("line", {"class": "whisker", "x1": x(row.low), "x2": x(row.high), "y1": cy, "y2": cy, "stroke": c}),
    ]
    for v in (row.low, row.high):
        out.append(_el("line", {"x1": x(v), "x2": x(v), "y1": cy - 4.0, "y2": cy + 4.0, "stroke": c}))
    box = {"y": cy - 7.0, "height": 14, "fill": c}
    box_x = {"x": x(row.q1), "width": x(row.q3) - x(row.q1)}
    out.append(_el("rect", {"class": "box", **box_x, **box, "fill-opacity": 0.12, "stroke": c}))
    ci_x = {"x": x(row.ci[0]), "width": x(row.ci[1]) - x(row.ci[0])}
    out.append(_el("rect", {"class": "ci", **ci_x, **box, "fill-opacity": 0.35}))
    for i, v in enumerate(row.samples):
        dot = {"class": "sample", "cx": x(v), "cy": cy + 11 * _jitter(i), "r": 2.2, "fill": c, "fill-opacity": 0.6}
        out.append(_el("circle", dot))
    med = {"class": "median", "x1": x(row.median), "x2": x(row.median), "y1": cy - 9.0, "y2": cy + 9.0}
    out.append(_el("line", {**med, "stroke": "#111", "stroke-width": 2}))
    label = {"class": "median-value", "x": _X1 + 10.0, "y": cy + 4, "font-size": 12, "font-weight": "bold"}
    out.append(_el("text", label, f"{_ms(row.median)} ms"))
    out.append("</g>")
    return out


def _attrs_text(attrs: dict[str, object]) -> str:
    return " ".join(f"{k}={quoteattr(str(v))}" for k, v in attrs.items())


def render_svg(records: Sequence[BenchRecord], title: str | None = None) -> str:
    """The picture as an SVG document (text); see the module docstring for what it shows."""
    plan = _plan(records)
    axis = plan.axis
    confidence = next((r.confidence for _, rows in plan.groups for r in rows), 0.95)
    body: list[str] = []
    y = float(_TOP)
    if axis is None:
        body.append(_el("text", {"x": _LABEL_X, "y": y + 10, "fill": "#555"}, "no model was measured"))
        y += 24
    else:
        grid_top = y
        for model, rows in plan.groups:
            body.append(f"<g {_attrs_text({'class': 'model', 'data-model': model})}>")
            body.append(_el("line", {"x1": 12, "x2": _W - 12, "y1": y, "y2": y, "stroke": "#ddd"}))
            body.append(
                _el(
                    "text", {"class": "model-name", "x": 12, "y": y + 19, "font-size": 14, "font-weight": "bold"}, model
                )
            )
            y += _GROUP_H
            for row in rows:
                body.extend(_svg_row(row, axis, y + _ROW_H / 2))
                y += _ROW_H
            body.append("</g>")
        y += 6
        grid, ticks = ['<g class="grid">'], ['<g class="axis">']
        ticks.append(_el("line", {"x1": _X0, "x2": _X1, "y1": y, "y2": y, "stroke": "#555"}))
        for t in axis.ticks:
            tx = _X0 + (_X1 - _X0) * axis.at(t)
            grid.append(_el("line", {"x1": tx, "x2": tx, "y1": grid_top, "y2": y, "stroke": "#eee"}))
            ticks.append(_el("line", {"x1": tx, "x2": tx, "y1": y, "y2": y + 5, "stroke": "#555"}))
            ticks.append(
                _el("text", {"class": "tick", "x": tx, "y": y + 18, "font-size": 11, "text-anchor": "middle"}, _tick(t))
            )
        ticks.append(_el("text", {"x": (_X0 + _X1) / 2, "y": y + 36, "text-anchor": "middle"}, axis.label))
        body = [*grid, "</g>", *body, *ticks, "</g>"]  # the grid behind the rows
        y += 48
    if plan.failed:
        y += 8
        body.append('<g class="failed">')
        body.append(_el("text", {"x": 12, "y": y + 12, "font-weight": "bold", "fill": "#b00020"}, "Failed"))
        y += _FAIL_H + 4
        for lines in plan.failed:
            attrs = {"class": "failure", "x": _LABEL_X, "y": y + 12, "font-size": 12}
            more = "".join(_el("tspan", {"x": _LABEL_X, "dy": _FAIL_LINE_H}, line) for line in lines[1:])
            body.append(f"<text {_attrs_text(attrs)}>{escape(lines[0])}{more}</text>")
            y += _FAIL_H + _FAIL_LINE_H * (len(lines) - 1)
        body.append("</g>")
    height = round(y + 16)
    head = title or "tether bench: latency per model and device"
    root = {
        "xmlns": "http://www.w3.org/2000/svg",
        "viewBox": f"0 0 {_W} {height}",
        "width": _W,
        "height": height,
        "font-family": _FONT,
        "font-size": 13,
        "fill": "#111",
    }
    return "\n".join(
        [
            f"<svg {_attrs_text(root)}>",
            _el("title", {}, head),
            _el("rect", {"width": "100%", "height": "100%", "fill": "#fff"}),
            _el("text", {"class": "title", "x": 12, "y": 30, "font-size": 18, "font-weight": "bold"}, head),
            _el("text", {"x": 12, "y": 52, "font-size": 12, "fill": "#555"}, EXPLAIN.format(ci=_percent(confidence))),
            *body,
            "</svg>",
            "",
        ]
    )


# -- raster, through matplotlib ------------------------------------------------------------------


def check_plot_path(path: str | os.PathLike[str]) -> None:
    """Raise :class:`~tether.errors.ConfigError` unless a plot can be written to ``path``'s file type:
    ``.svg`` always; others when matplotlib is installed and writes them."""
    suffix = Path(path).suffix.lower()
    if suffix == ".svg":
        return
    if not suffix:
        raise ConfigError(f"{os.fspath(path)!r} has no file type: name it .svg (or .png, with matplotlib)")
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as exc:
        raise ConfigError(
            f"writing {suffix} plots needs matplotlib: pip install 'tether[plot]' "
            "(or write an .svg, which needs nothing)"
        ) from exc
    supported = FigureCanvasBase.get_supported_filetypes()
    if suffix[1:] not in supported:
        raise ConfigError(f"cannot write {suffix} plots; use .svg, or one of matplotlib's: {', '.join(supported)}")


def write_plot(records: Sequence[BenchRecord], path: str | os.PathLike[str], title: str | None = None) -> None:
    """Draw ``records`` to ``path``: ``.svg`` by hand, other file types with matplotlib.

    Raises :class:`~tether.errors.ConfigError` for a file type that cannot be written (see
    :func:`check_plot_path`), OSError when the file cannot be.
    """
    check_plot_path(path)
    if Path(path).suffix.lower() == ".svg":
        Path(path).write_text(render_svg(records, title), encoding="utf-8")
    else:
        _write_matplotlib(_plan(records), path, title or "tether bench: latency per model and device")


def _write_matplotlib(plan: _Plan, path: str | os.PathLike[str], title: str) -> None:
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from matplotlib.transforms import blended_transform_factory

    lines = sum(1 + len(rows) for _, rows in plan.groups)
    fail_lines = sum(len(lines) for lines in plan.failed)
    fail_in = 0.3 + 0.22 * fail_lines if plan.failed else 0.0
    top_in, axis_in, width_in = 0.9, 0.7, 10.0
    height_in = top_in + 0.3 * max(lines, 1) + axis_in + fail_in
    fig = Figure(figsize=(width_in, height_in))
    ax = fig.add_axes(
        (2.9 / width_in, (axis_in + fail_in) / height_in, 6.1 / width_in, 0.3 * max(lines, 1) / height_in)
    )
    fig.text(0.12 / width_in, 1 - 0.35 / height_in, title, fontsize=13, fontweight="bold", va="center")
    confidence = next((r.confidence for _, rows in plan.groups for r in rows), 0.95)
    fig.text(0.12 / width_in, 1 - 0.62 / height_in, EXPLAIN.format(ci=_percent(confidence)), fontsize=8.5, color="#555")
    left = blended_transform_factory(fig.transFigure, ax.transData)
    right = blended_transform_factory(ax.transAxes, ax.transData)
    ticks_y, labels_y = [], []
    y = 0.0
    for model, rows in plan.groups:
        ax.text(0.12 / width_in, y + 0.5, model, transform=left, fontweight="bold", fontsize=10, va="center")
        y += 1
        for row in rows:
            cy = y + 0.5
            ticks_y.append(cy)
            labels_y.append(_cut(row.device, 40))
            ax.hlines(cy, row.low, row.high, colors=row.color, linewidth=1, zorder=2)
            ax.vlines([row.low, row.high], cy - 0.15, cy + 0.15, colors=row.color, linewidth=1, zorder=2)
            box = Rectangle((row.q1, cy - 0.25), row.q3 - row.q1, 0.5, facecolor=to_rgba(row.color, 0.12))
            box.set_edgecolor(row.color)
            ax.add_patch(box)
            ax.add_patch(Rectangle((row.ci[0], cy - 0.25), row.ci[1] - row.ci[0], 0.5, color=to_rgba(row.color, 0.35)))
            ys = [cy + 0.4 * _jitter(i) for i in range(len(row.samples))]
            ax.scatter(row.samples, ys, s=7, color=row.color, alpha=0.6, linewidths=0, zorder=3)
            ax.vlines(row.median, cy - 0.33, cy + 0.33, colors="#111", linewidth=2, zorder=4)
            ax.text(1.01, cy, f"{_ms(row.median)} ms", transform=right, fontsize=9, fontweight="bold", va="center")
            y += 1
    ax.set_ylim(max(y, 1.0), 0)
    ax.set_yticks(ticks_y, labels=labels_y, fontsize=8.5)
    ax.tick_params(axis="y", length=0)
    if plan.axis is not None:
        if plan.axis.log:
            ax.set_xscale("log")
        ax.set_xlim(plan.axis.lo, plan.axis.hi)
        ax.set_xticks(plan.axis.ticks, labels=[_tick(t) for t in plan.axis.ticks])
        ax.set_xticks([], minor=True)
        ax.set_xlabel(plan.axis.label)
        ax.grid(axis="x", color="#e5e5e5")
        ax.set_axisbelow(True)
    else:
        ax.set_xticks([])
        ax.text(0.5, 0.5, "no model was measured", transform=ax.transAxes, ha="center", va="center")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if plan.failed:
        fig.text(0.12 / width_in, (fail_in - 0.2) / height_in, "Failed", color="#b00020", fontweight="bold")
        for i, line in enumerate(line for lines in plan.failed for line in lines):
            fig.text(0.3 / width_in, (fail_in - 0.42 - 0.22 * i) / height_in, line, fontsize=8.5)
    fig.savefig(path, dpi=150, facecolor="white")
