"""``tether bench``: models timed on the pool's devices, one table to compare them (JSON/CSV for more)."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ..errors import ConfigError
from ._args import (
    add_model_flags,
    check_locally,
    existing_file,
    load_npz,
    model_options,
    output_file,
    positive,
    seconds,
    unservable_after,
)
from ._tls import tls_from_args
from .compare import add_baseline_flags, baseline_step

if TYPE_CHECKING:
    from ..client.bench import BenchEvent, BenchRecord

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
    p.add_argument(
        "models",
        nargs="+",
        type=existing_file,
        metavar="MODEL",
        help="model files (.onnx, a TVM library, a reference .json)",
    )
    add_model_flags(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--all-devices", action="store_true", help="every server of the key, at once")
    group.add_argument("--parallel", type=positive, default=1, metavar="N", help="N servers at once")
    p.add_argument(
        "--reference",
        nargs="?",
        const="onnxruntime",
        type=_reference,
        default=None,
        metavar="Y.NPZ",
        help="check outputs: against a local onnxruntime run (bare flag) or expected outputs by name (.npz)",
    )
    p.add_argument("--rtol", type=seconds, default=1e-4, help="relative tolerance for --reference")
    p.add_argument("--atol", type=seconds, default=1e-5, help="absolute tolerance for --reference")
    p.add_argument(
        "--json",
        type=output_file,
        default=None,
        metavar="FILE",
        help="write every record, raw samples and device tracebacks included",
    )
    p.add_argument("--csv", type=output_file, default=None, metavar="FILE", help="write one row per model and device")
    p.add_argument(
        "--plot",
        type=output_file,
        default=None,
        metavar="FILE",
        help="draw the latency distributions: .svg (no dependency), .png and others with matplotlib",
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr (queue position, models measured)")
    add_baseline_flags(p)
    rules = p.add_argument_group("validity: a result that breaks a rule is shown INVALID (or NOISY)")
    rules.add_argument(
        "--min-duration",
        type=seconds,
        default=0.1,
        metavar="S",
        help="seconds of timed runs a result needs in all (number x repeat x run time) (default: 0.1; 0: off)",
    )
    rules.add_argument(
        "--min-samples", type=positive, default=5, metavar="N", help="samples a result needs (default: 5)"
    )
    rules.add_argument(
        "--max-cv",
        type=seconds,
        default=5.0,
        metavar="PCT",
        help="largest coefficient of variation of the samples, in %% (default: 5; 0: off)",
    )
    rules.add_argument(
        "--max-ci",
        type=seconds,
        default=5.0,
        metavar="PCT",
        help="widest 95%% CI of the median, in %% of the median (default: 5; 0: off)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="after the timing, per-operator times from the device's runtime profiler (slowest shown; all in --json)",
    )
    p.add_argument("--profile-runs", type=positive, default=10, metavar="N", help="runs to profile (default: 10)")
    p.add_argument(
        "--profile-top", type=positive, default=10, metavar="N", help="operators shown per model (default: 10)"
    )
    p.set_defaults(run=run)


def _reference(text: str) -> str | Path:
    return text if text == "onnxruntime" else existing_file(text)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.3f}"


def _words(text: str, width: int = 160) -> str:
    """The first line of ``text``, shortened at a word boundary when longer than ``width``."""
    line = " ".join((text.strip().splitlines() or [""])[0].split())
    if len(line) <= width:
        return line
    cut = line.rfind(" ", 0, width - 2)
    return line[: cut if cut > 0 else width - 2] + " …"


def run(args: argparse.Namespace) -> int:
    from ..client.bench import BenchInterrupted, BenchSettings, bench
    from ..client.plot import check_plot_path
    from ..client.stats import ValidityRules

    if args.repeat < 1:
        raise ConfigError("tether bench needs --repeat 1 or more (samples per model and device)")
    if args.plot:
        check_plot_path(args.plot)  # before the queue, not after the measurements
    host, port, inputs = check_locally(args, args.models)
    reference: str | dict[str, Any] | None = args.reference
    if isinstance(args.reference, Path):
        reference = load_npz(args.reference, "--reference")
    settings = BenchSettings(
        number=args.number,
        repeat=args.repeat,
        min_repeat_ms=args.min_repeat_ms,
        warmup=args.warmup,
        cooldown_ms=args.cooldown_ms,
        run_timeout=args.run_timeout or None,
        fill=args.fill,
        backend=args.backend,
        options=model_options(args),
        inputs=inputs,
        shapes=dict(args.shape),
        reference=reference,
        rtol=args.rtol,
        atol=args.atol,
        rules=ValidityRules(args.min_samples, args.min_duration, args.max_cv / 100, args.max_ci / 100),
        profile=args.profile,
        profile_runs=args.profile_runs,
    )
    progress = None if args.quiet else Progress(sys.stderr, tty=sys.stderr.isatty())
    code = None
    try:
        records = bench(
            host,
            port,
            args.key,
            args.models,
            settings,
            labels=dict(args.label) or None,
            devices=None if args.all_devices else args.parallel,
            timeout=args.timeout or None,
            unservable_after=unservable_after(args),
            on_event=progress,
            tls=tls_from_args(args),
        )
    except BenchInterrupted as exc:  # keep what finished: the table and the files
        records, code = exc.records, 130
    finally:
        if progress is not None:
            progress.close()
    _print_table(records, args)
    _print_fidelity(records, args)
    _write_files(records, args)
    regressed = baseline_step(records, args, settings)
    if args.verbose:
        for r in records:
            if r.error and r.error.get("traceback"):
                print(
                    f"\n{r.model} on {r.device}: {r.error['type']}: {r.error['message']}\n{r.error['traceback']}",
                    file=sys.stderr,
                )
    if code is not None:
        return code
    return 0 if all(r.error is None for r in records) and not regressed else 1


def _print_table(records: list[BenchRecord], args: argparse.Namespace) -> None:
    header = ["model", "device", "load ms", "median ms", "95% CI", "mean", "std", "min", "p90", "p99", "n"]
    header.append("valid")
    header += ["outputs"] if args.reference else []
    rows = []
    for r in records:
        s = r.stats
        row = [r.model, r.device, _ms(r.load_s)]
        if s is None:
            row += ["-"] * 8
        else:
            ci = f"{_ms(s.median_ci[0])}..{_ms(s.median_ci[1])}"
            row += [_ms(s.median), ci, _ms(s.mean), _ms(s.std), _ms(s.min), _ms(s.p90), _ms(s.p99), str(s.n)]
        row.append(r.verdict)
        row += ["match" if r.checked else "-"] if args.reference else []
        rows.append(row)
    errors = [f"{r.error['type']}: {_words(r.error.get('message', ''))}" if r.error else "" for r in records]
    if any(errors):
        header.append("error")
        rows = [[*row, error] for row, error in zip(rows, errors, strict=True)]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if args.reference:
        against = "a local onnxruntime run" if args.reference == "onnxruntime" else args.reference
        matched = sum(r.checked for r in records)
        print(
            f"outputs checked against {against}: {matched} of {len(records)} matched within "
            f"rtol {args.rtol:g}, atol {args.atol:g}"
        )


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.0f} MiB"


def conditions_line(conditions: dict[str, Any] | None) -> str:
    """The device's conditions in one line: governors, frequencies and temperatures (before -> after),
    load average, other sessions, threads, affinity."""
    if not conditions:
        return "conditions: not recorded (an older server)"
    before, after = conditions.get("before") or {}, conditions.get("after") or {}
    parts = []
    governors = sorted({g for g in (conditions.get("governor") or {}).values() if g})
    parts.append(f"governor {'/'.join(governors) or '-'}")

    def freq(snap: dict[str, Any]) -> str:
        values = [v for v in (snap.get("freq_mhz") or {}).values() if v]
        return f"{min(values):.0f}-{max(values):.0f}" if values else "-"

    parts.append(f"MHz {freq(before)}->{freq(after)}")
    temps0, temps1 = before.get("temp_c") or {}, after.get("temp_c") or {}
    if temps0 or temps1:
        parts.append(f"max °C {max(temps0.values(), default=0):.0f}->{max(temps1.values(), default=0):.0f}")
    load0, load1 = before.get("loadavg"), after.get("loadavg")
    if load0 and load1:
        parts.append(f"load {load0[0]:.2f}->{load1[0]:.2f}")
    others = conditions.get("other_sessions")
    parts.append(f"other sessions {'-' if others is None else others}")
    threads = dict(conditions.get("threads") or {})
    shown = {k: v for k, v in threads.items() if k not in ("runtime", "providers", "device") and v is not None}
    parts.append("threads " + (",".join(f"{k}={v}" for k, v in shown.items()) or "-"))
    cpus = conditions.get("affinity")
    parts.append(f"cpus {len(cpus)}" if cpus else "cpus -")
    return "conditions: " + ", ".join(parts)


def _print_fidelity(records: list[BenchRecord], args: argparse.Namespace) -> None:
    """Per measured record: its conditions and peak memory in one line, its warnings, its slowest operators."""
    for r in records:
        if r.stats is None:
            continue
        print(f"\n{r.model} on {r.device}: {r.verdict}")
        print(f"  {conditions_line(r.conditions)}")
        print(
            f"  peak memory (worker RSS): {_mib(r.memory.get('after_load'))} after load, "
            f"{_mib(r.memory.get('after_bench'))} after the benchmark"
        )
        for warning in r.warnings:
            tag = "NOISY" if warning.startswith("too noisy") else "INVALID" if warning.startswith("too ") else "note"
            print(f"  {tag}: {warning}")
        if args.profile:
            if r.profile is None:
                print(f"  profile: none ({r.profile_error or 'not returned'})")
                continue
            shown = min(args.profile_top, len(r.profile))
            print(f"  top {shown} of {len(r.profile)} operators ({args.profile_runs} runs):")
            table = [["operator", "op", "calls", "ms/run", "%"]]
            for op in r.profile[: args.profile_top]:
                table.append(
                    [str(op["name"])[:60], str(op["op"]), str(op["calls"]), f"{op['per_run_s'] * 1e3:.3f}",
                     f"{op['percent']:.1f}"]
                )  # fmt: skip
            widths = [max(len(row[i]) for row in table) for i in range(5)]
            for row in table:
                print("    " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _write_files(records: list[BenchRecord], args: argparse.Namespace) -> None:
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
                    "checked",
                    "error",
                    "valid",
                    "peak_rss_load",
                    "peak_rss_bench",
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
                writer.writerow(
                    [r.model, r.device, labels, r.backend or "", r.load_s or "", *stats, r.checked, error,
                     "" if r.valid is None else r.valid, r.memory.get("after_load") or "",
                     r.memory.get("after_bench") or ""]
                )  # fmt: skip
    if args.plot:
        from ..client.plot import write_plot

        title = f"tether bench: key {args.key}, {args.number} runs x {args.repeat} samples per model and device"
        write_plot(records, args.plot, title=title)
