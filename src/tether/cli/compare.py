"""``tether compare A B``: two models measured interleaved on the same devices, and a verdict; also
saved results against each other (``--saved``), and ``tether bench``'s baselines (``--save-baseline``,
``--baseline``), which use the same statistics."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ._args import add_model_flags, check_locally, existing_file, model_options, output_file, positive, unservable_after
from ._tls import tls_from_args

if TYPE_CHECKING:
    from ..client.baseline import Entry
    from ..client.bench import BenchRecord, BenchSettings
    from ..client.compare import CompareResult

__all__ = ["add_baseline_flags", "add_parser", "baseline_step", "percent", "run"]


def percent(text: str) -> float:
    """``5%`` or ``5`` (percent) -> 0.05."""
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        value = -1.0
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a percentage such as 5% (0 or more), not {text!r}")
    return value / 100


@dataclass(frozen=True, slots=True)
class LoadedBaseline:
    path: Path
    entries: list[Entry]


def baseline_file(text: str) -> LoadedBaseline:
    """A baseline (or ``tether bench --json``) file, read and checked now, before a device is taken."""
    from ..client.baseline import load_entries

    path = existing_file(text)
    try:
        return LoadedBaseline(path, load_entries(path))
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "compare",
        help="A/B: two models measured interleaved (ABBA) on the same devices, with a verdict and its "
        "confidence interval; or two saved results (--saved)",
    )
    p.add_argument(
        "a", type=existing_file, metavar="A", help="the model to compare against (or, with --saved, the old result)"
    )
    p.add_argument("b", type=existing_file, metavar="B", help="the model compared (or, with --saved, the new result)")
    p.add_argument(
        "--saved",
        action="store_true",
        help="A and B are saved results (tether bench --json, --save-baseline, tether compare --json): compare "
        "them offline, devices matched by fingerprint",
    )
    add_model_flags(p)
    key = next(a for a in p._actions if "--key" in a.option_strings)
    key.required = False  # (not with --saved: checked in run)
    key.help = "the device key to request (not with --saved)"
    group = p.add_mutually_exclusive_group()
    group.add_argument("--all-devices", action="store_true", help="every server of the key, at once")
    group.add_argument("--devices", type=positive, default=1, metavar="N", help="N servers at once")
    p.add_argument(
        "--rounds", type=positive, default=10, metavar="R", help="rounds per device; each measures A and B (ABBA order)"
    )
    p.add_argument(
        "--confidence",
        type=_confidence,
        default=0.95,
        metavar="C",
        help="of the intervals, 0..1 (at 0.95 a verdict takes 6 rounds or more; at 0.999, 11)",
    )
    p.add_argument(
        "--min-effect",
        type=percent,
        default=0.01,
        metavar="PCT",
        help="smaller changes are no difference, even when significant (default: 1%%)",
    )
    p.add_argument(
        "--fail-if-slower",
        type=percent,
        default=None,
        metavar="PCT",
        help="exit 1 when B is significantly slower than A by more than PCT (e.g. 5%%) on any device or overall",
    )
    p.add_argument("--json", type=output_file, default=None, metavar="FILE", help="write samples, statistics, verdicts")
    p.add_argument(
        "--plot",
        type=output_file,
        default=None,
        metavar="FILE",
        help="draw A's and B's distributions per device: .svg (no dependency), .png and others with matplotlib",
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(run=run)


def _confidence(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a confidence between 0 and 1 (0.95), not {text!r}")
    return value


def add_baseline_flags(p: argparse.ArgumentParser) -> None:
    """``tether bench``'s ``--save-baseline``, ``--baseline`` and ``--regression-threshold``."""
    p.add_argument(
        "--save-baseline",
        type=output_file,
        default=None,
        metavar="FILE",
        help="write the samples per model and device fingerprint as a baseline for --baseline",
    )
    p.add_argument(
        "--baseline",
        type=baseline_file,
        default=None,
        metavar="FILE",
        help="compare with a saved baseline (or bench --json); exit 1 on a regression over --regression-threshold",
    )
    p.add_argument(
        "--regression-threshold",
        type=percent,
        default=0.05,
        metavar="PCT",
        help="with --baseline: a significant slowdown over PCT is a regression (default: 5%%)",
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.3f}"


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def run(args: argparse.Namespace) -> int:
    if args.saved:
        return _run_saved(args)
    from ..client.bench import BenchSettings
    from ..client.compare import compare
    from ..client.plot import check_plot_path
    from ..client.stats import min_rounds
    from .bench import Progress

    if not args.key:
        raise ConfigError("tether compare needs --key (or --saved, to compare saved results)")
    if args.repeat < 1:
        raise ConfigError("tether compare needs --repeat 1 or more (samples per model, device and round)")
    if args.rounds < min_rounds(args.confidence):
        raise ConfigError(
            f"--rounds {args.rounds} cannot show a difference at confidence {args.confidence:g}: "
            f"use {min_rounds(args.confidence)} or more"
        )
    if args.plot:
        check_plot_path(args.plot)
    host, port, inputs = check_locally(args, [args.a, args.b])
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
        confidence=args.confidence,
    )
    progress = None if args.quiet else Progress(sys.stderr, tty=sys.stderr.isatty())
    try:
        result = compare(
            host,
            port,
            args.key,
            args.a,
            args.b,
            settings=settings,
            rounds=args.rounds,
            min_effect=args.min_effect,
            labels=dict(args.label) or None,
            devices=None if args.all_devices else args.devices,
            timeout=args.timeout or None,
            unservable_after=unservable_after(args),
            on_event=progress,
            tls=tls_from_args(args),
        )
    finally:
        if progress is not None:
            progress.close()
    failed = _report(result, args)
    if args.json:
        doc = result.to_dict()
        doc["fail_if_slower"] = args.fail_if_slower
        doc["failed"] = failed
        args.json.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    if args.plot:
        _plot(result, args.plot)
    errors = any(d.error for d in result.devices) or result.overall is None
    return 1 if failed or errors else 0


def _report(result: CompareResult, args: argparse.Namespace) -> bool:
    """Print the table and the verdict; whether --fail-if-slower fails."""
    from ..client.compare import is_regression

    s = result.settings
    print(f"A: {result.a}\nB: {result.b}")
    print(
        f"{result.rounds} rounds in ABBA order on {len(result.devices)} device(s); per round and model "
        f"{s.repeat} samples of {s.number} runs\nB/A: Hodges-Lehmann estimate of the per-round ratio, "
        f"{s.confidence * 100:g} % signed-rank CI"
    )
    rows = [["device", "A median ms", "B median ms", "B/A", f"{s.confidence * 100:g}% CI", "verdict"]]
    slower: list[str] = []
    for d in result.devices:
        c = d.comparison
        if c is None:
            error = d.error or {"type": "error", "message": ""}
            rows.append([d.device, "-", "-", "-", "-", f"{error['type']}: {' '.join(error['message'].split())[:120]}"])
            continue
        rows.append(
            [d.device, _ms(c.a_median), _ms(c.b_median), f"{c.ratio:.3f}", f"{c.ci[0]:.3f}..{c.ci[1]:.3f}", c.verdict()]
        )
        if args.fail_if_slower is not None and is_regression(c, args.fail_if_slower):
            slower.append(d.device)
    _table(rows)
    if result.overall is not None:
        print(f"verdict: {result.overall.verdict()}")
        if args.fail_if_slower is not None and is_regression(result.overall, args.fail_if_slower):
            slower.append("overall")
    else:
        print("verdict: none (no device measured both models)")
    if slower:
        print(f"FAIL: B is slower than A by more than {args.fail_if_slower * 100:g} % ({', '.join(slower)})")
    return bool(slower)


def _plot(result: CompareResult, path: Path) -> None:
    """A group per device (its verdict in the title), in it a row for A and one for B."""
    from ..client.bench import BenchRecord
    from ..client.plot import write_plot

    records = []
    for d in result.devices:
        group = f"{d.device}: {d.comparison.verdict() if d.comparison else 'failed'}"
        for side, name, rounds in (("A", result.a, d.a_rounds), ("B", result.b, d.b_rounds)):
            samples = [x for r in rounds for x in r]
            stats = d.stats("a" if side == "A" else "b")
            error = None if samples else (d.error or {"type": "NoSamples", "message": "no samples"})
            records.append(BenchRecord(group, f"{side}: {name}", samples=samples, stats=stats, error=error))
    verdict = result.overall.verdict() if result.overall else "no verdict"
    write_plot(records, path, title=f"tether compare: {result.b} vs {result.a}: {verdict}")


def _run_saved(args: argparse.Namespace) -> int:
    from ..client.baseline import compare_saved, load_entries
    from ..client.compare import is_regression

    old, new = load_entries(args.a), load_entries(args.b)
    pairs = compare_saved(old, new, confidence=args.confidence, min_effect=args.min_effect)
    if not pairs:
        raise ConfigError(f"{args.a} and {args.b} have no model in common (name them alike, or save one model each)")
    print(
        f"A: {args.a} (saved)\nB: {args.b} (saved)\nB/A: Hodges-Lehmann estimate of the ratio, "
        f"{args.confidence * 100:g} % Mann-Whitney CI; devices matched by fingerprint"
    )
    rows = [["A model", "B model", "fingerprint", "A median ms", "B median ms", "B/A", "CI", "verdict"]]
    slower = []
    for pair in pairs:
        for o, _, c in pair.devices:
            ci = f"{c.ci[0]:.3f}..{c.ci[1]:.3f}"
            rows.append(
                [pair.a, pair.b, o.fingerprint, _ms(c.a_median), _ms(c.b_median), f"{c.ratio:.3f}", ci, c.verdict()]
            )
            if args.fail_if_slower is not None and is_regression(c, args.fail_if_slower):
                slower.append(f"{pair.b} on {o.fingerprint}")
        for fp in pair.unmatched:
            rows.append([pair.a, pair.b, fp, "-", "-", "-", "-", "in one file only"])
    _table(rows)
    for pair in pairs:
        verdict = pair.overall.verdict() if pair.overall else "none (no device in both)"
        print(f"verdict {pair.b} vs {pair.a}: {verdict}")
        if (
            pair.overall is not None
            and args.fail_if_slower is not None
            and is_regression(pair.overall, args.fail_if_slower)
        ):
            slower.append(f"{pair.b} overall")
    if slower:
        print(f"FAIL: B is slower than A by more than {args.fail_if_slower * 100:g} % ({', '.join(slower)})")
    if args.json:
        doc: dict[str, Any] = {
            "format": "tether-compare-saved/1",
            "a": str(args.a),
            "b": str(args.b),
            "pairs": [p.to_dict() for p in pairs],
        }
        doc["failed"] = bool(slower)
        args.json.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return 1 if slower else 0


def baseline_step(records: list[BenchRecord], args: argparse.Namespace, settings: BenchSettings) -> bool:
    """``tether bench``'s baseline flags, after the measurements: check against ``--baseline`` (print a
    table), then write ``--save-baseline``. True when a regression exceeds ``--regression-threshold``."""
    from ..client.baseline import check_baseline, entries_from_records, save_baseline

    regressed = False
    loaded: LoadedBaseline | None = getattr(args, "baseline", None)
    if loaded is not None:
        threshold = args.regression_threshold
        rows = check_baseline(loaded.entries, entries_from_records(records), threshold=threshold)
        print(f"\nagainst the baseline {loaded.path} (regression: significantly slower by over {threshold * 100:g} %)")
        table = [["model", "fingerprint", "devices", "baseline ms", "now ms", "result"]]
        for row in rows:
            c = row.comparison
            a, b = (c.a_median, c.b_median) if c else (None, None)
            table.append([row.model, row.fingerprint, ", ".join(row.devices), _ms(a), _ms(b), row.text(threshold)])
        _table(table)
        regressed = any(row.status == "regression" for row in rows)
        if regressed:
            print("FAIL: a regression against the baseline")
    if getattr(args, "save_baseline", None):
        entries = save_baseline(records, args.save_baseline, settings)
        print(f"baseline saved to {args.save_baseline}: {len(entries)} model/device entries")
    return regressed
