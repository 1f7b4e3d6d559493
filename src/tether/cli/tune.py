"""``tether tune``: an ONNX model auto-tuned on the pool, exported, and measured against its untuned self.

The seeds' ``python3 -m tvm.driver.tvmc tune --target=... --target-host=... --rpc-key K --rpc-tracker H:P
model.onnx --output F`` works with ``tether tune`` in its place (``tvmc`` is gone from TVM since 0.20):
``--rpc-key``, ``--rpc-tracker`` and ``--output`` are aliases, ``TVM_TRACKER_HOST``/``TVM_TRACKER_PORT``
name the tracker when no flag does, and old CLI target strings are translated to the JSON TVM 0.27 takes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ._args import count, existing_file, hostport, output_file, seconds, tracker_address

__all__ = ["add_parser", "run", "table"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("tune", help="auto-tune an ONNX model with meta_schedule on the pool's devices")
    p.add_argument("model", type=existing_file, help="the ONNX model")
    p.add_argument(
        "--tracker",
        "--rpc-tracker",
        type=hostport,
        default=None,
        metavar="HOST:PORT",
        help="the tracker (default: TVM_TRACKER_HOST/TVM_TRACKER_PORT, else 127.0.0.1:9190)",
    )
    p.add_argument("--key", "--rpc-key", required=True, help="the device key to measure on")
    p.add_argument(
        "--target",
        required=True,
        help='JSON (\'{"kind": "llvm", "num-cores": 4}\') or an old CLI string ("llvm -mtriple=aarch64-linux-gnu")',
    )
    p.add_argument("--target-host", default=None, help="the host target, in either form")
    p.add_argument("--cc", default=None, help="compiler to link libraries with (e.g. aarch64-linux-gnu-g++)")
    p.add_argument("--trials", type=count(0), default=64, help="measurements in all, over every task")
    p.add_argument("--trials-per-task", type=count(1), default=None, metavar="N", help="at most N per task")
    p.add_argument(
        "--trials-per-iter",
        type=count(1),
        default=None,
        metavar="N",
        help="candidates per batch (default: trials / (2 x tasks), at most 64)",
    )
    p.add_argument(
        "--work-dir",
        default=None,
        metavar="DIR",
        help="meta_schedule's database and tether's measurements: a second run continues "
        "(default: a directory named after the model and key in the temporary directory)",
    )
    p.add_argument("-o", "--output", type=output_file, default=None, metavar="FILE", help="the tuned library (.so)")
    p.add_argument("--json", type=output_file, default=None, metavar="FILE", help="write the report as JSON")
    p.add_argument(
        "--runner",
        choices=["auto", "tether", "tvm"],
        default="auto",
        help="measure with TetherRunner or TVM's RPCRunner (auto: tether when every server speaks it)",
    )
    p.add_argument("--devices", type=count(1), default=None, metavar="N", help="servers at once (default: all)")
    p.add_argument("--builders", type=count(1), default=None, metavar="N", help="build processes (default: CPUs)")
    p.add_argument("--number", type=count(1), default=3, help="runs per measurement (meta_schedule's evaluator)")
    p.add_argument("--repeat", type=count(1), default=1, help="measurements per candidate")
    p.add_argument("--min-repeat-ms", type=seconds, default=0.0, help="grow number until a repeat takes this long")
    p.add_argument("--session-timeout", type=seconds, default=60.0, help="seconds for one candidate on a device")
    p.add_argument(
        "--cost-model",
        choices=["auto", "xgb", "random"],
        default="auto",
        help="auto: xgb when xgboost is installed, else random",
    )
    p.add_argument("--seed", type=int, default=0, help="the search's seed")
    p.add_argument("--no-measure", action="store_true", help="skip the untuned vs tuned measurement at the end")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(run=run)


def _ms(record: dict[str, Any] | None) -> str:
    if not record or not record.get("stats"):
        return "-"
    s = record["stats"]
    return f"{s['median'] * 1e3:.4f} ({s['median_ci'][0] * 1e3:.4f}..{s['median_ci'][1] * 1e3:.4f})"


def table(report: dict[str, Any]) -> str:
    """The report as text: the tasks, then untuned vs tuned."""
    lines = [f"{'task':<40} {'trials':>6} {'best ms':>10}"]
    for t in report["progress"].get("tasks", []):
        best = "-" if t["best_ms"] is None else f"{t['best_ms']:.4f}"
        lines.append(f"{t['name'][:40]:<40} {t['trials']:>6} {best:>10}")
    lines.append(
        f"trials: {report['trials_before']} before, {report['trials_run']} this run "
        f"({report['measured']} measured, {report['cached']} from the work dir's measurements), "
        f"build failures {report['build_failures']}"
    )
    failures = report["progress"].get("failures") or {}
    if failures:
        lines.append("failures: " + ", ".join(f"{k} {v}" for k, v in sorted(failures.items())))
    if report.get("untuned") is not None:
        lines.append("")
        lines.append(f"{'model':<8} {'median ms (95% CI)':<32} {'checked vs onnxruntime':<24} device")
        for name in ("untuned", "tuned"):
            r = report[name]
            check = "yes" if r["checked"] else f"NO: {r['error']}" if r["error"] else "no"
            lines.append(f"{name:<8} {_ms(r):<32} {check:<24} {r['device']}")
        if report.get("speedup"):
            lines.append(f"speedup: x{report['speedup']:.2f}")
    lines.append(f"tuned library: {report['output']}  ({report['wall_s']:.1f} s)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..tune import TuneError, TuneOptions, default_work_dir, tune

    host, port = args.tracker if args.tracker is not None else tracker_address()
    work_dir = Path(args.work_dir) if args.work_dir else default_work_dir(args.model, args.key)
    opts = TuneOptions(
        model=args.model,
        tracker=(host, port),
        key=args.key,
        target=args.target,
        target_host=args.target_host,
        cc=args.cc,
        trials=args.trials,
        trials_per_iter=args.trials_per_iter or 0,
        max_trials_per_task=args.trials_per_task,
        work_dir=work_dir,
        output=args.output,
        runner=args.runner,
        devices=args.devices,
        builders=args.builders or 0,
        number=args.number,
        repeat=args.repeat,
        min_repeat_ms=args.min_repeat_ms,
        session_timeout_s=args.session_timeout,
        cost_model=args.cost_model,
        seed=args.seed,
        measure=not args.no_measure,
    )

    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:  # --log-level DEBUG: meta_schedule's too
        logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.DEBUG)

    def say(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    try:
        report = tune(opts, on_line=say).to_dict()
    except (TuneError, ConfigError) as exc:
        print(f"tether tune: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    print(table(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    bad = [n for n in ("untuned", "tuned") if report.get(n) is not None and not report[n]["checked"]]
    return 1 if bad else 0
