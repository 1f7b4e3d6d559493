"""``tether bench`` and its library: statistics from raw samples, fan-out over every device of a key."""

from __future__ import annotations

import csv
import io
import json
import queue
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tether
from tether.cli.bench import Progress
from tether.client.bench import BenchEvent, BenchRecord, BenchSettings, bench
from tether.client.plot import check_plot_path, render_svg, write_plot
from tether.client.query import query_tracker
from tether.client.stats import median_ci, summarize
from tether.client.tracker import TrackerClient
from tether.errors import ConfigError
from tether.protocol.tracker import Request, RequestOptions
from tether.runtime.reference import write_reference_model
from tether.tracker import TrackerThread

from .conftest import CliProcess, wait_until

pytestmark = pytest.mark.timeout(90)


def test_median_ci_matches_the_order_statistics_table() -> None:
    assert median_ci(list(range(1, 11))) == (2, 9)  # n=10: 2nd and 9th, coverage 97.9 %
    assert median_ci(list(range(1, 101))) == (40, 61)  # n=100: the textbook 40th and 61st
    assert median_ci([5.0, 6.0]) == (5.0, 6.0)  # too few samples: the whole range


@given(st.lists(st.floats(min_value=1e-6, max_value=10.0), min_size=1, max_size=200))
def test_summary_is_consistent(samples: list[float]) -> None:
    s = summarize(samples)
    assert s.min <= s.median_ci[0] <= s.median <= s.median_ci[1] <= s.max
    assert s.min <= s.p90 <= s.p99 <= s.max
    assert s.median == statistics.median(samples) and s.n == len(samples)


def _model(path: Path, scale: float) -> Path:
    spec = {"name": "x", "dtype": "float32", "shape": [4, 4]}
    write_reference_model(
        path, [spec], [{**spec, "name": "y"}], [{"op": "affine", "input": "x", "output": "y", "scale": scale}]
    )
    return path


def test_all_devices_fan_out_over_three_labelled_servers(
    tracker: TrackerThread, device_server: Any, tmp_path: Path
) -> None:
    for soc in ("a", "b", "c"):
        device_server(key="pool", tracker=(tracker.host, tracker.port), labels={"soc": soc})
    good = _model(tmp_path / "good.json", 2.0)
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "tether-reference/1", "inputs": []')
    records = bench(
        tracker.host,
        tracker.port,
        "pool",
        [good, broken],
        BenchSettings(number=2, repeat=7),
        devices=None,
        timeout=30,
    )
    assert sorted(r.labels["soc"] for r in records if r.model == "good.json") == ["a", "b", "c"]
    for r in records:
        if r.model == "good.json":
            assert r.error is None and r.stats is not None and r.stats.n == 7 and len(r.samples) == 7
            assert r.load_s is not None and r.facts.get("cores")
        else:
            assert r.error is not None and r.error["type"] == "ModelLoadError"
    # the CLI: one table, JSON and CSV, exit code 1 because one model failed to load
    out_json, out_csv, out_svg = tmp_path / "out.json", tmp_path / "out.csv", tmp_path / "out.svg"
    done = subprocess.run(
        [sys.executable, "-m", "tether", "--log-level", "WARNING", "bench", str(good), "--tracker",
         f"{tracker.host}:{tracker.port}", "--key", "pool", "--all-devices", "--number", "1", "--repeat", "3",
         "--label", "soc=b", "--json", str(out_json), "--csv", str(out_csv), "--plot", str(out_svg)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "median ms" in done.stdout and "soc=b" in done.stdout
    assert "good.json (1/1) measuring" in done.stderr and "done in" in done.stderr  # plain progress lines
    (record,) = json.loads(out_json.read_text())
    assert record["labels"] == {"soc": "b"} and len(record["samples"]) == 3
    rows = list(csv.DictReader(out_csv.read_text().splitlines()))
    assert len(rows) == 1 and rows[0]["labels"] == "soc=b" and float(rows[0]["median_s"]) > 0
    svg = ET.parse(out_svg).getroot()
    assert len(svg.findall(f".//{SVG}g[@class='row']")) == 1 and len(svg.findall(f".//{SVG}circle")) == 3


def test_reference_checks_report_wrong_answers(tracker: TrackerThread, device_server: Any, tmp_path: Path) -> None:
    """A tiny ONNX model checked against a local onnxruntime run, and a reference model against an .npz."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    device_server(key="check", tracker=(tracker.host, tracker.port))
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "double",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    onnx_path = tmp_path / "double.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=9), str(onnx_path))
    (ok,) = bench(
        tracker.host, tracker.port, "check", [onnx_path], BenchSettings(number=1, repeat=2, reference="onnxruntime")
    )
    assert ok.error is None and ok.stats is not None
    model = _model(tmp_path / "affine.json", 2.0)  # y = 2x, checked against y = 3x
    x = np.ones((4, 4), "float32")
    wrong = BenchSettings(number=1, repeat=2, inputs={"x": x}, reference={"y": 3 * x})
    (bad,) = bench(tracker.host, tracker.port, "check", [model], wrong)
    assert bad.error is not None and bad.error["type"] == "WrongAnswer" and "max |diff| 1" in bad.error["message"]
    right = BenchSettings(number=1, repeat=2, inputs={"x": x}, reference={"y": 2 * x})
    (good,) = bench(tracker.host, tracker.port, "check", [model], right)
    assert good.error is None and good.stats is not None and good.stats.n == 2


# -- progress ---------------------------------------------------------------------------------------


def _next_event(
    events: queue.Queue[BenchEvent], wanted: Callable[[BenchEvent], bool], timeout: float = 20
) -> BenchEvent:
    deadline = time.monotonic() + timeout
    seen = []
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            event = events.get(timeout=remaining)
        except queue.Empty:
            break
        if wanted(event):
            return event
        seen.append(event.text)
    pytest.fail(f"no such event within {timeout} s; saw {seen}")


def test_cli_shows_the_queue_position_while_the_only_server_is_busy(
    tracker: TrackerThread, device_server: Any, cli: Callable[..., CliProcess], tmp_path: Path
) -> None:
    """stderr is a pipe here, not a terminal: plain lines, the queue's only when its position changes."""
    device_server(key="solo", tracker=(tracker.host, tracker.port))
    model = _model(tmp_path / "m.json", 2.0)
    with tether.connect_tracker(tracker.host, tracker.port) as pool:
        held = pool.request("solo", timeout=10)
        proc = cli("--log-level", "WARNING", "bench", str(model), "--tracker", f"{tracker.host}:{tracker.port}",
                   "--key", "solo", "--number", "1", "--repeat", "3", "--timeout", "60")  # fmt: skip
        line = proc.wait_line("queued for key", timeout=30)
        assert re.search(r"queued for key 'solo': position 1 of 1 \(0 ahead\), waited \d+\.\d s$", line), line
        held.close()
    proc.wait_line("m.json (1/1) measuring", timeout=30)
    proc.wait_line("median ms", timeout=30)  # the table
    assert proc.proc.wait(timeout=30) == 0
    assert sum("queued for key" in seen for seen in proc.seen) <= 2  # one, or a second after 5 s at most


def test_bench_events_count_the_requests_ahead_then_the_models(
    tracker: TrackerThread, device_server: Any, tmp_path: Path
) -> None:
    device_server(key="solo", tracker=(tracker.host, tracker.port))
    models = [_model(tmp_path / "a.json", 2.0), _model(tmp_path / "b.json", 3.0)]
    events: queue.Queue[BenchEvent] = queue.Queue()
    done: dict[str, Any] = {}

    def run() -> None:
        done["records"] = bench(tracker.host, tracker.port, "solo", models, BenchSettings(number=1, repeat=2),
                                timeout=30, on_event=events.put, poll_s=0.1)  # fmt: skip

    runner = threading.Thread(target=run, daemon=True)
    with (
        tether.connect_tracker(tracker.host, tracker.port) as pool,
        pool.request("solo", timeout=10),
        TrackerClient.connect(tracker.host, tracker.port) as other,
    ):
        # another user's request, higher priority, waits before bench's
        other.send(Request("solo", "other", 2, RequestOptions("other-1", "tether", {}, 60.0, "other")))
        wait_until(lambda: [w.id for w in query_tracker(tracker.host, tracker.port).waiters] == ["other-1"])
        runner.start()
        second = _next_event(events, lambda e: e.kind == "queued" and e.ahead == 1)
        assert second.positions == (2,) and second.queue_length == 2 and second.waited_s is not None
        assert "position 2 of 2 (1 ahead)" in second.text
        assert other.cancel("other-1")
        first = _next_event(events, lambda e: e.kind == "queued" and e.ahead == 0)
        assert first.positions == (1,) and first.queue_length == 1
    # the occupying session closed: bench gets the server
    measuring = _next_event(events, lambda e: e.kind == "measuring" and e.model == "b.json")
    assert (measuring.index, measuring.count) == (2, 2) and measuring.device
    result = _next_event(events, lambda e: e.kind == "result")
    assert result.model == "b.json" and result.record is not None and result.record.stats is not None
    assert "median" in result.text and str(result) == result.text
    _next_event(events, lambda e: e.kind == "done")
    runner.join(10)
    assert [r.error for r in done["records"]] == [None, None]
    assert events.empty()  # nothing after "done": the queue watch has stopped


@pytest.mark.tvm
def test_against_tvms_tracker_progress_tells_waited_time_only(tmp_path: Path) -> None:
    """TVM's tracker lists no waiters: queued events carry no positions. It cannot bind port 0 either."""
    tvm_tracker = pytest.importorskip("tvm.rpc.tracker")
    start = random.randint(20000, 55000)
    tvm = tvm_tracker.Tracker(host="127.0.0.1", port=start, port_end=start + 200, silent=True)
    try:
        events: list[BenchEvent] = []
        model = _model(tmp_path / "m.json", 2.0)
        (record,) = bench("127.0.0.1", tvm.port, "absent", [model], timeout=1.0, on_event=events.append, poll_s=0.2)
    finally:
        tvm.terminate()
    assert record.error is not None and record.error["type"] == "RequestTimeout"
    queued = [e for e in events if e.kind == "queued"]
    assert queued and all(e.positions == () and e.waited_s is not None for e in queued)
    assert "position unknown: not tether's tracker" in queued[-1].text


def _event(kind: Any, text: str, device: str | None = None, positions: tuple[int, ...] = ()) -> BenchEvent:
    return BenchEvent(kind, text, device, positions=positions, ahead=positions[0] - 1 if positions else None)


def test_progress_plain_lines_throttle_the_queue_and_a_terminal_redraws_one_line() -> None:
    now = [0.0]
    out = io.StringIO()
    plain = Progress(out, tty=False, clock=lambda: now[0])
    for t, pos in ((0.5, 3), (1.0, 3), (1.5, 2), (2.0, 2), (7.0, 2)):
        now[0] = t
        plain(_event("queued", f"queued at {pos}, waited {t} s", positions=(pos,)))
    plain(_event("session", "d1: session open", "d1"))
    assert out.getvalue().splitlines() == [
        "  queued at 3, waited 0.5 s", "  queued at 2, waited 1.5 s", "  queued at 2, waited 7.0 s",
        "  d1: session open",
    ]  # fmt: skip

    term = io.StringIO()
    tty = Progress(term, tty=True, width=lambda: 40)
    tty(_event("queued", "queued at 1"))
    tty(_event("session", "d1: session open", "d1"))
    tty(_event("measuring", "d1: m (1/1) measuring", "d1"))
    tty(_event("measuring", "d2: m (1/1) measuring, a long line to cut", "d2"))
    tty(_event("result", "d1: m median 1 ms", "d1"))
    tty.close()
    clear = "\r\x1b[K"
    assert term.getvalue() == (
        f"{clear}queued at 1"
        f"{clear}  d1: session open\n"
        f"{clear}d1: m (1/1) measuring"
        f"{clear}d1: m (1/1) measuring | d2: m (1/1) mea"  # cut to the width, less one column
        f"{clear}  d1: m median 1 ms\n"
        f"{clear}d2: m (1/1) measuring, a long line to c"
        f"{clear}"
    )


# -- plot -------------------------------------------------------------------------------------------

SVG = "{http://www.w3.org/2000/svg}"


def test_plot_two_models_on_two_devices_as_svg_and_png(
    tracker: TrackerThread, device_server: Any, tmp_path: Path
) -> None:
    for soc in ("a", "b"):
        device_server(key="duo", tracker=(tracker.host, tracker.port), labels={"soc": soc})
    models = [_model(tmp_path / "fast.json", 2.0), _model(tmp_path / "slow & <odd>.json", 3.0)]
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    records = bench(
        tracker.host, tracker.port, "duo", [*models, broken], BenchSettings(number=1, repeat=6), devices=None
    )
    assert sum(r.error is None for r in records) == 4
    out = tmp_path / "plot.svg"
    write_plot(records, out, title="two & two")
    root = ET.parse(out).getroot()  # well-formed XML, escaped names included
    assert root.tag == f"{SVG}svg" and root.get("viewBox", "").startswith("0 0 ")
    groups = root.findall(f".//{SVG}g[@class='model']")
    assert [g.get("data-model") for g in groups] == ["fast.json", "slow & <odd>.json"]
    for group in groups:
        rows = group.findall(f"{SVG}g[@class='row']")
        assert sorted(r.get("data-device", "")[-7:] for r in rows) == ["[soc=a]", "[soc=b]"]
        for row in rows:
            record = next(r for r in records if (r.model, r.device) == (row.get("data-model"), row.get("data-device")))
            assert len(row.findall(f"{SVG}circle[@class='sample']")) == len(record.samples) == 6
            assert len(row.findall(f"{SVG}rect[@class='ci']")) == 1
            assert row.findtext(f"{SVG}text[@class='median-value']", "").endswith(" ms")
    texts = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert "two & two" in texts and "slow & <odd>.json" in texts and "[soc=a]" in texts and "[soc=b]" in texts
    failures = [t.text or "" for t in root.iter(f"{SVG}text") if t.get("class") == "failure"]
    assert len(failures) == 2 and all("broken.json on " in f and ": ModelLoadError" in f for f in failures)

    pytest.importorskip("matplotlib")
    png = tmp_path / "plot.png"
    write_plot(records, png)
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000


def _records(medians_s: dict[str, float]) -> list[BenchRecord]:
    out = []
    for model, m in medians_s.items():
        samples = [m * f for f in (0.9, 1.0, 1.0, 1.1, 1.3)]
        out.append(BenchRecord(model, "dev", samples=samples, stats=summarize(samples)))
    return out


def test_plot_axis_is_linear_with_nice_ticks_and_logarithmic_past_a_ratio_of_20() -> None:
    def ticks(svg: str) -> list[str]:
        return [t.text or "" for t in ET.fromstring(svg).iter(f"{SVG}text") if t.get("class") == "tick"]

    linear = render_svg(_records({"a": 0.004, "b": 0.006}))
    assert "latency, ms</text>" in linear and ticks(linear) == ["3", "4", "5", "6", "7", "8"]  # 3.6..7.8 ms
    log = render_svg(_records({"a": 0.001, "b": 0.03}))  # 0.9..39 ms: three decades, 1-2-5 ticks
    assert "(log scale)" in log and ticks(log)[:4] == ["0.1", "0.2", "0.5", "1"] and ticks(log)[-1] == "100"
    wide = render_svg(_records({"a": 0.0001, "b": 0.03}))  # 0.09..39 ms: decades only
    assert ticks(wide) == ["0.01", "0.1", "1", "10", "100"]
    assert "no model was measured" in render_svg(
        [BenchRecord("*", "?", error={"type": "RequestTimeout", "message": "x"})]
    )


def test_raster_plots_without_matplotlib_fail_early_naming_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.backend_bases", None)  # as if not installed
    check_plot_path(tmp_path / "fine.svg")
    with pytest.raises(ConfigError, match=r"pip install 'tether\[plot\]'"):
        check_plot_path(tmp_path / "out.png")
    model = _model(tmp_path / "m.json", 2.0)
    # the CLI, with matplotlib hidden the same way; it fails before asking the tracker (port 1: nobody)
    code = (
        "import sys; sys.modules['matplotlib.backend_bases'] = None; from tether.cli import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    args = ["bench", str(model), "--tracker", "127.0.0.1:1", "--key", "k", "--plot", str(tmp_path / "x.png")]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "pip install 'tether[plot]'" in done.stderr, done.stderr
    assert not (tmp_path / "x.png").exists()


def test_error_taxonomy_in_bench(tracker: TrackerThread, device_server: Any, tmp_path: Path) -> None:
    """Each failure is reported as what it is, the models after a timeout included: a model that fails to
    load, one that raises at run time, one with a wrong answer, one that outlives its time limit (which
    ends the session: the model after it is reported not measured, not dropped)."""
    import numpy as np

    device_server(key="errs", tracker=(tracker.host, tracker.port))
    spec = {"name": "x", "dtype": "float32", "shape": [4, 4]}

    def ref(name: str, *ops: dict[str, Any]) -> Path:
        path = tmp_path / name
        affine = {"op": "affine", "input": "x", "output": "y", "scale": 2.0}
        write_reference_model(path, [spec], [{**spec, "name": "y"}], [*ops, affine])
        return path

    broken = tmp_path / "broken.json"
    broken.write_text("{")
    models = [
        broken,
        ref("raises.json", {"op": "raise", "message": "boom"}),
        ref("good.json"),
        ref("slow.json", {"op": "sleep", "seconds": 30}),
        ref("after.json"),
    ]
    x = np.ones((4, 4), dtype="float32")
    settings = BenchSettings(number=1, repeat=2, inputs={"x": x}, reference={"y": 2 * x}, run_timeout=1.0)
    records = {r.model: r for r in bench(tracker.host, tracker.port, "errs", models, settings, timeout=30)}
    assert records["good.json"].error is None and records["good.json"].stats is not None
    kinds = {name: (r.error or {}).get("type") for name, r in records.items()}
    assert kinds == {
        "broken.json": "ModelLoadError",
        "raises.json": "ModelRunError",
        "good.json": None,
        "slow.json": "RunTimeout",
        "after.json": "NotMeasured",
    }
    assert "boom" in str(records["raises.json"].error)
    wrong = bench(
        tracker.host, tracker.port, "errs", [ref("good2.json")], BenchSettings(inputs={"x": x}, reference={"y": x})
    )
    assert wrong[0].error is not None and wrong[0].error["type"] == "WrongAnswer"


# -- a first hour without friction ---------------------------------------------------------------------


def test_cli_errors_have_their_own_column_and_reference_checks_are_reported(
    capsys: pytest.CaptureFixture[str], tracker: TrackerThread, device_server: Any, tmp_path: Path
) -> None:
    import numpy as np

    from tether.cli import main

    server = device_server(key="cols", tracker=(tracker.host, tracker.port))
    words = " ".join(f"word{i:02d}" for i in range(60))  # 419 characters
    good = _model(tmp_path / "good.json", 2.0)
    spec = {"name": "x", "dtype": "float32", "shape": [4, 4]}
    raising = tmp_path / "raises.json"
    affine = {"op": "affine", "input": "x", "output": "y", "scale": 2.0}
    write_reference_model(raising, [spec], [{**spec, "name": "y"}], [{"op": "raise", "message": words}, affine])
    x = np.ones((4, 4), "float32")
    np.savez(tmp_path / "x.npz", x=x)
    np.savez(tmp_path / "y.npz", y=2 * x)
    out_json = tmp_path / "out.json"
    code = main(
        ["bench", str(good), str(raising), "--tracker", f"{tracker.host}:{tracker.port}", "--key", "cols",
         "--number", "1", "--repeat", "2", "--input", str(tmp_path / "x.npz"), "--reference", str(tmp_path / "y.npz"),
         "--json", str(out_json), "--quiet"]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 1 and err == ""
    header, good_row, bad_row, checked = out.splitlines()[:4]  # (then each result's conditions and warnings)
    assert header.split() == [
        "model", "device", "load", "ms", "median", "ms", "95%", "CI", "mean", "std", "min", "p90", "p99", "n",
        "valid", "outputs", "error",
    ]  # fmt: skip
    error_at = header.index("error")
    assert good_row.split()[-1] == "match" and len(good_row) <= error_at  # no error: nothing in that column
    assert bad_row.startswith(f"raises.json  127.0.0.1:{server.port}")
    error = bad_row[error_at:]
    assert error.startswith("ModelRunError: word00 word01") and error.endswith(" …")
    assert all(re.fullmatch(r"word\d\d", w) for w in error[len("ModelRunError: ") : -2].split())  # whole words
    assert (
        checked
        == "outputs checked against " + str(tmp_path / "y.npz") + ": 1 of 2 matched within rtol 0.0001, atol 1e-05"
    )
    records = json.loads(out_json.read_text())
    assert records[0]["checked"] is True and records[1]["checked"] is False
    assert records[1]["error"]["message"] == words  # the whole of it, and the device's traceback
    assert "Traceback (most recent call last)" in records[1]["error"]["traceback"]


def test_ctrl_c_keeps_what_finished(
    tracker: TrackerThread, device_server: Any, cli: Callable[..., CliProcess], tmp_path: Path
) -> None:
    """SIGINT while the second model runs: the table, the JSON and the CSV hold the first model's results
    and the second as interrupted; exit code 130; the device's session ends with the process."""
    device_server(key="intr", tracker=(tracker.host, tracker.port))
    fast = _model(tmp_path / "fast.json", 2.0)
    spec = {"name": "x", "dtype": "float32", "shape": [4, 4]}
    slow = tmp_path / "slow.json"
    write_reference_model(slow, [spec], [spec], [{"op": "sleep", "seconds": 300}])
    out_json, out_csv = tmp_path / "out.json", tmp_path / "out.csv"
    proc = cli("--log-level", "WARNING", "bench", str(fast), str(slow), "--tracker", f"{tracker.host}:{tracker.port}",
               "--key", "intr", "--number", "1", "--repeat", "2", "--json", str(out_json), "--csv", str(out_csv))  # fmt: skip
    proc.wait_line("fast.json median", timeout=60)
    proc.wait_line("slow.json (2/2) measuring", timeout=60)
    proc.proc.send_signal(signal.SIGINT)
    assert proc.proc.wait(timeout=30) == 130
    proc.wait_line("fast.json  ")  # the table's row
    row = proc.wait_line("slow.json  ")
    assert row.endswith("Interrupted: cut short by Ctrl-C")
    fast_record, slow_record = json.loads(out_json.read_text())
    assert fast_record["error"] is None and len(fast_record["samples"]) == 2
    assert slow_record["error"]["type"] == "Interrupted"
    rows = list(csv.DictReader(out_csv.read_text().splitlines()))
    assert [r["model"] for r in rows] == ["fast.json", "slow.json"] and rows[1]["error"].startswith("Interrupted")
    wait_until(lambda: tracker.call(lambda: tracker.core.summary()["queue_info"]["intr"]["free"]) == 1, timeout=30)


def test_bench_generates_inputs_of_dynamic_shape(tracker: TrackerThread, device_server: Any, tmp_path: Path) -> None:
    """An input with a dynamic dim needs a shape: measured with one, a typed error naming --shape without."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    device_server(key="dyn", tracker=(tracker.host, tracker.port))
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "dyn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    path = tmp_path / "dyn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    fixed = _model(tmp_path / "fixed.json", 2.0)  # also takes an "x": [4, 4], fixed, so no shape applies to it
    shapes = {"x": (5, 3)}
    checked = BenchSettings(number=1, repeat=2, shapes=shapes, reference="onnxruntime")
    (record,) = bench(tracker.host, tracker.port, "dyn", [path], checked)
    assert record.error is None and record.checked and record.stats is not None
    records = bench(tracker.host, tracker.port, "dyn", [path, fixed], BenchSettings(number=1, repeat=2, shapes=shapes))
    assert [r.error for r in records] == [None, None]
    (missing,) = bench(tracker.host, tracker.port, "dyn", [path], BenchSettings(number=1, repeat=2))
    assert missing.error is not None and missing.error["type"] == "InputError"
    assert "--shape x=" in missing.error["message"]


def test_plot_wraps_long_failure_lines() -> None:
    words = " ".join(f"word{i:02d}" for i in range(40))  # 279 characters: three lines
    records = [
        *_records({"a": 0.001}),
        BenchRecord("b.onnx", "dev", error={"type": "ModelLoadError", "message": words}),
    ]
    root = ET.fromstring(render_svg(records))
    (failure,) = [t for t in root.iter(f"{SVG}text") if t.get("class") == "failure"]
    lines = [failure.text or "", *(t.text or "" for t in failure.findall(f"{SVG}tspan"))]
    assert len(lines) == 3 and all(len(line) <= 130 for line in lines)
    assert " ".join(" ".join(lines).split()) == f"b.onnx on dev: ModelLoadError: {words}"  # nothing cut
