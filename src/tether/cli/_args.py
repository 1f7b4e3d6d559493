"""Argument types shared by several subcommands, and the flags ``tether run`` and ``tether bench`` share.

Types check what can be checked before anything else happens (a file that is not there, a bad
``HOST:PORT``): argparse then reports one line and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..aio.net import parse_hostport
from ..client.tracker import tracker_address_from_env
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..runtime import TensorSpec

__all__ = [
    "add_auth_flags",
    "add_model_flags",
    "check_inputs",
    "check_locally",
    "count",
    "non_negative",
    "existing_file",
    "hostport",
    "label",
    "load_npz",
    "model_options",
    "output_file",
    "port",
    "positive",
    "seconds",
    "shape",
    "tracker_address",
    "unservable_after",
]

FILL_KINDS = ("random", "zeros", "ones")
#: How long a request that no registered server could serve waits before the tracker says why.
UNSERVABLE_AFTER_S = 5.0
BACKENDS = ("onnxruntime", "tvm", "reference")


def add_auth_flags(p: argparse.ArgumentParser, peers: str) -> None:
    """``--auth-file`` and ``--allow-tvm``, the same on tracker, server and proxy."""
    p.add_argument(
        "--auth-file",
        type=existing_file,
        default=None,
        metavar="FILE",
        help="turn authentication on: one `name role secret [max_priority=N]` a line (roles admin, server, "
        "user; `tether token NAME ROLE` makes a line); reloaded on SIGHUP. Own token: $TETHER_TOKEN",
    )
    p.add_argument(
        "--allow-tvm",
        nargs="+",
        default=[],
        metavar="CIDR",
        help=f"with --auth-file: {peers} from these networks may go on without a token (TVM cannot send one)",
    )


def label(text: str) -> tuple[str, str]:
    """``--label name=value``."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"labels are name=value, not {text!r}")
    return name, value


def hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (a bare host: port 9190, as TVM's tools)."""
    try:
        return parse_hostport(text, 9190)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def port(text: str) -> int:
    """A TCP port, 0..65535 (0: the OS chooses)."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535, not {text!r}")
    return int(text)


def count(minimum: int) -> Callable[[str], int]:
    """An integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, not {text!r}")
        return value

    return parse


positive = count(1)
non_negative = count(0)


def seconds(text: str) -> float:
    """A non-negative number of seconds (or milliseconds, by the flag's name)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a non-negative number, not {text!r}")
    return value


def existing_file(text: str) -> Path:
    """A file that is there and readable now."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no file {text!r}" if not path.exists() else f"{text!r} is not a file")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"cannot read {text!r}")
    return path


def output_file(text: str) -> Path:
    """A file to write later: its directory must be there now (before a device is taken)."""
    path = Path(text)
    if path.is_dir() or not path.parent.is_dir():
        raise argparse.ArgumentTypeError(
            f"cannot write {text!r}: " + ("a directory" if path.is_dir() else "no such directory")
        )
    return path


def shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``--shape NAME=D1,D2,...`` (``NAME=``: a scalar)."""
    name, sep, dims = text.partition("=")
    parts = [d.strip() for d in dims.split(",")] if dims.strip() else []
    if not sep or not name or not all(d.isdigit() for d in parts):
        raise argparse.ArgumentTypeError(
            f"shapes are NAME=D1,D2,... with whole numbers, e.g. x=1,3,224,224; not {text!r}"
        )
    return name, tuple(int(d) for d in parts)


def tracker_address(host: str | None = None, port: int | None = None) -> tuple[str, int]:
    """The tracker's address: what was given, else ``TVM_TRACKER_HOST``/``TVM_TRACKER_PORT``, else
    127.0.0.1:9190. Raises :class:`ConfigError` for a ``TVM_TRACKER_PORT`` that is not a port."""
    env_port = os.environ.get("TVM_TRACKER_PORT", "")
    if port is None and env_port and not (env_port.isdigit() and int(env_port) <= 65535):
        raise ConfigError(f"TVM_TRACKER_PORT={env_port!r} is not a port (0..65535)")
    return tracker_address_from_env(host, port)


def load_npz(path: Path | None, flag: str) -> dict[str, Any] | None:
    """The arrays of an ``.npz`` by name (None for no path); :class:`ConfigError` naming ``flag`` when
    it cannot be read."""
    if path is None:
        return None
    import numpy as np

    if not zipfile.is_zipfile(path):
        raise ConfigError(f"{flag} {path}: not an .npz of arrays by name (numpy.savez writes one)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{flag} {path}: not a readable .npz ({exc})") from None


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The flags ``tether run`` and ``tether bench`` share, with one meaning and default each: which
    device (tracker, key, labels, queue time), how the model is loaded, how its inputs are made, how
    it is timed, how errors are shown."""
    device = p.add_argument_group("device")
    device.add_argument(
        "--tracker",
        type=hostport,
        default=None,
        metavar="HOST:PORT",
        help="the tracker (default: $TVM_TRACKER_HOST:$TVM_TRACKER_PORT, else 127.0.0.1:9190)",
    )
    device.add_argument("--key", required=True, help="the device key to request")
    device.add_argument(
        "--label",
        action="append",
        type=label,
        default=[],
        metavar="K=V",
        help="only servers with this label (repeatable)",
    )
    device.add_argument(
        "--timeout",
        type=seconds,
        default=300.0,
        metavar="S",
        help="seconds to wait in the queue for a device (0: forever)",
    )
    device.add_argument(
        "--wait-for-servers",
        action="store_true",
        help=f"wait (up to --timeout) for servers still booting; by default a request that no registered "
        f"server could serve (key, protocol, labels) fails after {UNSERVABLE_AFTER_S:g} s with the reason",
    )
    model = p.add_argument_group("model")
    model.add_argument("--backend", choices=BACKENDS, default=None, help="the device's runtime (default: by file type)")
    model.add_argument(
        "--provider", action="append", default=[], metavar="NAME", help="onnxruntime execution provider (repeatable)"
    )
    model.add_argument("--function", default=None, help="tvm: the entry function (default: main)")
    model.add_argument(
        "--run-timeout",
        type=seconds,
        default=None,
        metavar="S",
        help="seconds for the model's load, and for each run or measurement; past it the device ends the "
        "session (RunTimeout) (default: 0, no limit)",
    )
    inputs = p.add_argument_group("inputs")
    inputs.add_argument(
        "--input",
        type=existing_file,
        default=None,
        metavar="X.NPZ",
        help="inputs by name, sent once, kept on the device",
    )
    inputs.add_argument(
        "--fill", choices=FILL_KINDS, default="random", help="how the device generates the inputs --input does not give"
    )
    inputs.add_argument(
        "--shape",
        action="append",
        type=shape,
        default=[],
        metavar="NAME=D1,D2,...",
        help="the shape to generate input NAME in, for inputs with dynamic dims or an unknown rank (repeatable)",
    )
    timing = p.add_argument_group("timing on the device (TVM's time_evaluator)")
    timing.add_argument("--number", type=positive, default=10, metavar="N", help="runs per sample")
    timing.add_argument("--repeat", type=non_negative, default=5, metavar="N", help="samples")
    timing.add_argument(
        "--min-repeat-ms", type=seconds, default=0.0, metavar="MS", help="grow --number until a sample lasts this long"
    )
    timing.add_argument("--warmup", type=non_negative, default=1, metavar="N", help="untimed runs first")
    timing.add_argument("--cooldown-ms", type=seconds, default=0.0, metavar="MS", help="pause between samples")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="a device's error in full, with its traceback (default: one line)"
    )
    from ._tls import add_client_tls_flags  # (it imports this module)

    add_client_tls_flags(p)


def unservable_after(args: argparse.Namespace) -> float | None:
    """The request's ``unservable_after`` for ``--wait-for-servers``."""
    return None if args.wait_for_servers else UNSERVABLE_AFTER_S


def check_inputs(
    models: Sequence[tuple[str, Sequence[TensorSpec] | None]],
    inputs: Mapping[str, Any] | None,
    args: argparse.Namespace,
) -> None:
    """Whether inputs can be made for each model (its name, and its input specs when known): the arrays
    of ``--input``, the ``--shape`` entries for its inputs that are not fixed (each must name some model's
    input), generated ones for the rest. Raises :class:`ConfigError` saying why not."""
    from ..client.inputs import input_problem, shapes_for

    shapes = dict(args.shape)
    named: set[str] = set()
    for name, specs in models:
        if specs is None:  # only the device can tell this model's inputs
            named.update(shapes)
            continue
        named.update(s.name for s in specs)
        sources = (f"--input {args.input}", "--shape")
        problem = input_problem(specs, inputs or {}, shapes_for(specs, shapes), sources)
        if problem:
            raise ConfigError(f"{name}: {problem}" if len(models) > 1 else problem)
    unknown = sorted(set(shapes) - named)
    if unknown:
        raise ConfigError(f"--shape {unknown}: not among the inputs of {', '.join(n for n, _ in models)}")


def check_locally(args: argparse.Namespace, models: Sequence[Path]) -> tuple[str, int, dict[str, Any] | None]:
    """What ``run`` and ``bench`` check before a device is taken, beyond the flags' types: the tracker's
    address, the ``--input`` arrays, and each model's inputs where its file can be read here. Returns the
    tracker's host and port, and the ``--input`` arrays; raises :class:`ConfigError`."""
    from ..client.inputs import local_input_specs

    host, port = tracker_address(*(args.tracker or ()))
    inputs = load_npz(args.input, "--input")
    check_inputs([(path.name, local_input_specs(path, args.backend)) for path in models], inputs, args)
    return host, port, inputs


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The backend options the model flags give."""
    options: dict[str, Any] = {"providers": args.provider} if args.provider else {}
    if args.function:
        options["function"] = args.function
    return options
