"""``tether usage``: the table, JSON, CSV and plots from a journal; times given as durations or dates;
mistakes as one line and exit code 2. ``tether tracker --db`` refuses a database it cannot use."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import sys
import time
from pathlib import Path

import pytest

from tether.cli import main
from tether.cli.usage import parse_when
from tether.journal import Journal
from tether.tracker.events import TrackerEvent

pytestmark = pytest.mark.timeout(60)

HOUR = 3600.0


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A journal with two keys and three users over the last six hours."""
    path = tmp_path_factory.mktemp("usage") / "history.db"
    now = time.time()
    t0 = now - 6 * HOUR
    events = [TrackerEvent("register", t0, k, s, None, {"peer": s, "slots": 1}) for k, s in
              (("android", "a:1"), ("android", "a:2"), ("rasp", "r:1"))]  # fmt: skip
    plan = [  # (key, server, user, start (h), held (h), waited (s), outcome)
        ("android", "a:1", "alice", 0.0, 1.0, 2.0, "ok"),
        ("android", "a:2", "bob", 1.0, 2.0, 4.0, "failed"),
        ("rasp", "r:1", "ci", 2.0, 3.0, 6.0, "ok"),
        ("android", "a:1", "ci", 5.0, 0.5, 8.0, "ok"),
    ]
    for i, (key, server, user, start, held, waited, outcome) in enumerate(plan):
        at = t0 + start * HOUR
        mk = f"m{i}"
        events += [
            TrackerEvent("grant", at, key, server, user, {"matchkey": mk, "waited_s": waited, "id": i}),
            TrackerEvent("session_start", at + 1, key, server, user, {"matchkey": mk}),
            TrackerEvent(
                "session_end",
                at + held * HOUR,
                key,
                server,
                user,
                {"matchkey": mk, "held_s": held * HOUR, "outcome": outcome},
            ),
        ]
    events.append(
        TrackerEvent("request_end", t0 + 3 * HOUR, "rasp", None, "bob", {"outcome": "timeout", "waited_s": 60.0})
    )
    with Journal(path) as j:
        for e in sorted(events, key=lambda e: e.wall):
            j.record(e)
    return path


def test_the_table_has_a_row_per_group_and_a_total(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["usage", "--db", str(db), "--by", "key"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "by key" in lines[0]
    android = next(line for line in lines if line.startswith("android"))
    assert android.split()[1:3] == ["3", "1"]  # sessions, failures
    total = next(line for line in lines if line.startswith("(total)"))
    assert total.split()[1] == "4" and total.split()[-1] == "1"  # never granted: the request that timed out


def test_json_is_the_report(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["usage", "--db", str(db), "--by", "user", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    users = {g["by"]: g for g in report["groups"]}
    assert users["ci"]["sessions"] == 2 and users["ci"]["busy_s"] == pytest.approx(3.5 * HOUR)
    assert users["bob"]["failures"] == 1 and users["bob"]["never_granted"] == 1
    assert report["total"]["sessions"] == 4 and report["total"]["devices"] == 3
    assert report["total"]["wait_p50_s"] == pytest.approx(6.0)  # 2, 4, 6, 8 and the timeout's 60
    assert report["window_s"] == pytest.approx(6 * HOUR, rel=0.01)  # cut to the journal's first record


def test_key_filter_and_by_server(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["usage", "--db", str(db), "--key", "android", "--by", "server", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    servers = {g["by"]: g for g in report["groups"]}
    assert set(servers) == {"a:1", "a:2"} and servers["a:1"]["sessions"] == 2
    assert servers["a:2"]["busy_fraction"] == pytest.approx(2 / 6, rel=0.01)


def test_csv_has_a_header_and_a_row_per_group(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["usage", "--db", str(db), "--by", "key", "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["key"] for r in rows] == ["android", "rasp", "(total)"]
    assert rows[1]["outcomes"] == "ok=1;timeout=1" and float(rows[0]["busy_s"]) == pytest.approx(3.5 * HOUR)


def test_since_and_until_cut_the_window(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["usage", "--db", str(db), "--since", "2h", "--by", "user", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # ci's session granted an hour ago; its rasp session (granted 4 h ago, ended 1 h ago) counts as busy time
    [ci] = report["groups"]
    assert ci["by"] == "ci" and ci["sessions"] == 1 and ci["busy_s"] == pytest.approx(1.5 * HOUR, rel=0.01)
    assert main(["usage", "--db", str(db), "--until", "10h", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["groups"] == []


def test_plot_svg_needs_nothing(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "usage.svg"
    assert main(["usage", "--db", str(db), "--plot", str(out)]) == 0
    svg = out.read_text()
    assert svg.startswith("<svg") and "Utilisation over time" in svg and "Wait-time distribution" in svg
    assert "android" in svg and "rasp" in svg and "p95" in svg
    assert "plot written" in capsys.readouterr().err


def test_plot_png_with_matplotlib(db: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "usage.png"
    assert main(["usage", "--db", str(db), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_png_without_matplotlib_says_what_to_install(
    db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backend_bases", None)
    assert main(["usage", "--db", str(db), "--plot", str(tmp_path / "u.png")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'tether[plot]'" in err and ".svg" in err and "Traceback" not in err
    assert not (tmp_path / "u.png").exists()


def test_mistakes_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["usage", "--db", str(tmp_path / "missing.db")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"tether usage: {tmp_path / 'missing.db'}: no such journal (the tracker writes it with --db {tmp_path / 'missing.db'})"
    ]
    assert main(["usage", "--db", "x.db", "--since", "yesterday"]) == 2
    assert "expected a duration back from now" in capsys.readouterr().err
    assert main(["usage", "--db", "x.db", "--json", "--csv"]) == 2


def test_parse_when() -> None:
    now = 1_700_000_000.0
    assert parse_when("30m", now) == now - 1800
    assert parse_when("12h", now) == now - 12 * 3600
    assert parse_when("7d", now) == now - 7 * 86400
    assert parse_when("1.5w", now) == now - 1.5 * 604800
    assert parse_when("2026-12-01", now) == dt.datetime(2026, 12, 1).timestamp()
    assert parse_when("2026-12-01T08:00+00:00", now) == dt.datetime(2026, 12, 1, 8, tzinfo=dt.timezone.utc).timestamp()


def test_tracker_refuses_a_db_it_cannot_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_a_journal = tmp_path / "notes.db"
    not_a_journal.write_text("not SQLite" * 200)
    assert main(["tracker", "--port", "0", "--db", str(not_a_journal)]) == 2
    assert "not a tether journal" in capsys.readouterr().err
    assert main(["tracker", "--port", "0", "--db", str(tmp_path / "no" / "such" / "dir.db")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["tracker", "--port", "0", "--db", "x.db", "--db-retention", "-1"]) == 2
