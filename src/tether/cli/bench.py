"""``tether bench``: models timed on the pool's devices, one table to compare them (JSON/CSV for more)."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from ..aio.net import parse_hostport
from ..errors import TetherError
from ._args import label

if TYPE_CHECKING:
    from ..client.bench import BenchEvent

__all__ = ["Progress", "add_parser", "run"]

_CLEAR_LINE = "\r\x1b[K"  # carriage return, then erase to the end of the line


class Progress:
    """Bench events on a text stream.

    On a terminal (``tty``): one status line redrawn in place, the passing states of every device (and
    the queue) side by side, cut to the terminal's width; finished steps printed as lines above it. Else
    one plain line per event, except queue updates: printed when the positions change, or every
    ``queue_every_s`` seconds.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        tty: bool,
        queue_every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        width: Callable[[], int] = lambda: shutil.get_terminal_size((100, 24)).columns,
    ) -> None:
        self._stream, self._tty, self._every, self._clock, self._width = stream, tty, queue_every_s, clock, width
        self._status: dict[str | None, str] = {}  # device (None: the queue) -> its passing state
        self._shown = ""
        self._last_queue: tuple[tuple[int, ...], int | None] | None = None
        self._last_queue_at = 0.0

    def __call__(self, event: BenchEvent) -> None:
        if self._tty:
            self._terminal(event)
        elif event.kind != "queued" or self._queue_news(event):
            self._stream.write(f"  {event.text}\n")
        self._stream.flush()

    def _queue_news(self, event: BenchEvent) -> bool:
        now, where = self._clock(), (event.positions, event.ahead)
        if where == self._last_queue and now - self._last_queue_at < self._every:
            return False
        self._last_queue, self._last_queue_at = where, now
        return True

    def _terminal(self, event: BenchEvent) -> None:
        if event.passing:
            self._status[event.device] = event.text
        else:
            self._status.pop(event.device, None)
            if event.kind == "session":
                self._status.pop(None, None)  # a grant: the queue's line is stale (the next poll redraws it)
            self._stream.write(f"{_CLEAR_LINE}  {event.text}\n")
            self._shown = ""
        line = " | ".join(self._status.values())[: max(self._width() - 1, 10)]
        if line != self._shown:
            self._stream.write(f"{_CLEAR_LINE}{line}")
            self._shown = line

    def close(self) -> None:
        """Erase the status line (terminal), so that what follows starts on a clean line."""
        if self._tty and self._shown:
            self._stream.write(_CLEAR_LINE)
            self._stream.flush()
            self._shown = ""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="time models on one, N or every device of a key, and compare them")
    p.add_argument("models", nargs="+", help="model files (.onnx, a TVM library, a reference .json)")
    p.add_argument("--tracker", required=True, help="HOST:PORT of the tracker")
    p.add_argument("--key", required=True, help="the device key")
    p.add_argument("--label", action="append", type=label, default=[], metavar="K=V", help="only servers with it")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--all-devices", action="store_true", help="every server of the key, at once")
    group.add_argument("--parallel", type=int, default=1, metavar="N", help="N servers at once (default 1)")
    p.add_argument("--number", type=int, default=10, help="runs per sample (default 10)")
    p.add_argument("--repeat", type=int, default=5, help="samples (default 5)")
    p.add_argument("--min-repeat-ms", type=float, default=0.0, help="grow --number until a sample lasts this long")
    p.add_argument(
        "--run-timeout",
        type=float,
        default=None,
        metavar="S",
        help="seconds for a model's load, and for its measurement; past it the device ends the session (RunTimeout)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--cooldown-ms", type=float, default=0.0, help="pause between samples")
    p.add_argument("--fill", default="random", help="inputs generated on the device: random, zeros, ones")
    p.add_argument("--backend", default=None, help="onnxruntime, tvm or reference (default: by file type)")
    p.add_argument("--provider", action="append", default=[], help="onnxruntime execution provider (repeatable)")
    p.add_argument("--input", default=None, metavar="X.NPZ", help="inputs by name, sent once and kept on the device")
    p.add_argument(
        "--reference",
        nargs="?",
        const="onnxruntime",
        default=None,
        metavar="Y.NPZ",
        help="check outputs: against a local onnxruntime run (bare flag) or expected outputs by name (.npz)",
    )
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance for --reference")
    p.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance for --reference")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait in the queue (default 300)")
    p.add_argument("--json", default=None, metavar="FILE", help="write every record, raw samples included")
    p.add_argument("--csv", default=None, metavar="FILE", help="write one row per model and device")
    p.add_argument(
        "--plot",
        default=None,
        metavar="FILE",
        help="draw the latency distributions: .svg (no dependency), .png and others with matplotlib",
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr (queue position, models measured)")
    p.set_defaults(run=run)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.3f}"


def run(args: argparse.Namespace) -> int:
    from ..client.bench import BenchSettings, bench
    from ..client.plot import check_plot_path, write_plot

    if args.plot:
        try:
            check_plot_path(args.plot)  # before the queue, not after the measurements
        except TetherError as exc:
            print(f"tether bench: {exc}", file=sys.stderr)
            return 2

    options: dict[str, Any] = {"providers": args.provider} if args.provider else {}
    reference: str | dict[str, Any] | None = args.reference
    inputs = None
    if args.input or (reference and reference != "onnxruntime"):
        import numpy as np

        if args.input:
            with np.load(args.input) as data:
                inputs = {k: data[k] for k in data.files}
        if args.reference and args.reference != "onnxruntime":
            with np.load(args.reference) as data:
                reference = {k: data[k] for k in data.files}
    settings = BenchSettings(
        number=args.number,
        repeat=args.repeat,
        min_repeat_ms=args.min_repeat_ms,
        warmup=args.warmup,
        cooldown_ms=args.cooldown_ms,
        run_timeout=args.run_timeout,
        fill=args.fill,
        backend=args.backend,
        options=options,
        inputs=inputs,
        reference=reference,
        rtol=args.rtol,
        atol=args.atol,
    )
    host, port = parse_hostport(args.tracker, 9190)
    progress = None if args.quiet else Progress(sys.stderr, tty=sys.stderr.isatty())
    try:
        records = bench(
            host,
            port,
            args.key,
            args.models,
            settings,
            labels=dict(args.label) or None,
            devices=None if args.all_devices else args.parallel,
            timeout=args.timeout,
            on_event=progress,
        )
    except (TetherError, FileNotFoundError) as exc:
        print(f"tether bench: {exc}", file=sys.stderr)
        return 2
    finally:
        if progress is not None:
            progress.close()
    header = ["model", "device", "load ms", "median ms", "95% CI", "mean", "std", "min", "p90", "p99", "n"]
    rows = []
    for r in records:
        s = r.stats
        if s is None:
            err = r.error or {}
            rows.append(
                [r.model, r.device, _ms(r.load_s), f"{err.get('type', 'error')}: {err.get('message', '')[:60]}"]
            )
            continue
        ci = f"{_ms(s.median_ci[0])}..{_ms(s.median_ci[1])}"
        rows.append(
            [
                r.model,
                r.device,
                _ms(r.load_s),
                _ms(s.median),
                ci,
                _ms(s.mean),
                _ms(s.std),
                _ms(s.min),
                _ms(s.p90),
                _ms(s.p99),
                str(s.n),
            ]
        )
    widths = [max(len(str(row[i])) for row in [header, *rows] if i < len(row)) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([r.to_dict() for r in records], f, indent=1)
    if args.csv:
        with open(args.csv, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(
                [
                    "model",
                    "device",
                    "labels",
                    "backend",
                    "load_s",
                    "median_s",
                    "ci_low_s",
                    "ci_high_s",
                    "mean_s",
                    "std_s",
                    "min_s",
                    "max_s",
                    "p90_s",
                    "p99_s",
                    "n",
                    "error",
                ]
            )
            for r in records:
                s = r.stats
                stats = (
                    [s.median, s.median_ci[0], s.median_ci[1], s.mean, s.std, s.min, s.max, s.p90, s.p99, s.n]
                    if s
                    else [""] * 10
                )
                labels = ",".join(f"{k}={v}" for k, v in sorted(r.labels.items()))
                error = f"{r.error['type']}: {r.error['message']}" if r.error else ""
                writer.writerow([r.model, r.device, labels, r.backend or "", r.load_s or "", *stats, error])
    if args.plot:
        title = f"tether bench: key {args.key}, {args.number} runs x {args.repeat} samples per model and device"
        try:
            write_plot(records, args.plot, title=title)
        except (TetherError, OSError) as exc:
            print(f"tether bench: {exc}", file=sys.stderr)
            return 2
    return 0 if all(r.error is None for r in records) else 1
