"""``tether service install``: the systemd unit it writes, checked by systemd itself where it is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tether.cli import main
from tether.cli.service import exec_quote, render_unit, unit_name

pytestmark = pytest.mark.timeout(60)


def install(tmp_path: Path, *argv: str) -> int:
    return main(["service", "install", *argv[:1], "--output", str(tmp_path), *argv[1:]])


def test_server_unit_content(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = install(
        tmp_path, "server", "--system", "--run-as", "tether", "--", "--tracker", "10.0.0.1:9190", "--key", "android"
    )
    out = capsys.readouterr().out
    assert code == 0
    unit = (tmp_path / "tether-server-android.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert " server --tracker 10.0.0.1:9190 --key android --work-dir %S/tether/tether-server-android/work" in exec_start
    assert exec_start.split("=", 1)[1].startswith("/")  # an absolute path: this installation of tether
    for line in (
        "Restart=always",
        "RestartSec=5",
        "StateDirectory=tether/tether-server-android",
        "WorkingDirectory=%S/tether/tether-server-android",
        "User=tether",
        "WantedBy=multi-user.target",
    ):
        assert line in unit.splitlines()
    assert "systemctl daemon-reload && systemctl enable --now tether-server-android" in out


def test_user_unit_and_the_role_state_flag_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = install(tmp_path, "tracker", "--user", "--", "--port", "9190", "--db", "/srv/hist.sqlite")
    out = capsys.readouterr().out
    unit = (tmp_path / "tether-tracker.service").read_text()
    assert code == 0 and "WantedBy=default.target" in unit
    assert "--db /srv/hist.sqlite" in unit and "history.sqlite" not in unit  # the given path stands
    assert "systemctl --user daemon-reload && systemctl --user enable --now tether-tracker" in out
    assert install(tmp_path, "proxy", "--user", "--run-as", "x") == 2  # User= is a system unit's


def test_quoting_of_arguments() -> None:
    assert exec_quote("plain-arg_1.2:3") == "plain-arg_1.2:3"
    assert exec_quote("lab 3") == '"lab 3"'
    assert exec_quote('say "hi"\\') == '"say \\"hi\\"\\\\"'
    assert exec_quote("50%") == "50%%" and exec_quote("$HOME") == '"$$HOME"'
    assert exec_quote("") == '""'
    unit = render_unit(
        "server",
        ["--key", "my phone", "--label", "room=lab 3"],
        name=unit_name("server", ["--key", "my phone"]),
        user_unit=False,
        command=(["/opt/tether venv/bin/tether"], {}),
    )
    assert 'ExecStart="/opt/tether venv/bin/tether" server --key "my phone" --label "room=lab 3"' in unit
    assert "StateDirectory=tether/tether-server-my-phone" in unit


def test_role_flags_are_checked_now(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert install(tmp_path, "server", "--", "--tracker", "h:9190", "--kye", "android") == 2
    assert "unrecognized arguments: --kye android" in capsys.readouterr().err
    assert install(tmp_path, "server", "--", "--tracker", "h:9190") == 2  # no --key: ServerConfig says so
    assert "--key is required" in capsys.readouterr().err
    assert install(tmp_path, "tracker", "--", "--port", "notaport") == 2
    assert install(tmp_path, "proxy", "--bogus") == 2
    assert list(tmp_path.iterdir()) == []


def test_no_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert install(tmp_path, "proxy", "--", "--port", "9090") == 0
    path = tmp_path / "tether-proxy.service"
    path.write_text("# mine\n")
    assert install(tmp_path, "proxy", "--", "--port", "9091") == 1
    assert "exists; --force replaces it" in capsys.readouterr().err
    assert path.read_text() == "# mine\n"
    assert install(tmp_path, "proxy", "--force", "--", "--port", "9091") == 0
    assert "--port 9091" in path.read_text()


def test_dry_run_prints_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert install(tmp_path, "tracker", "--dry-run", "--name", "lab-tracker") == 0
    out = capsys.readouterr().out
    assert (
        out.startswith("# Written by `tether service install tracker`") and "StateDirectory=tether/lab-tracker" in out
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("role", ["tracker", "server", "proxy"])
def test_systemd_analyze_verifies_the_unit(tmp_path: Path, role: str) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    flags = ["--tracker", "127.0.0.1:9190", "--key", "dev 1"] if role == "server" else []
    assert install(tmp_path, role, "--system", "--", *flags) == 0
    (unit,) = tmp_path.glob("*.service")
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert unit.name not in done.stderr, done.stderr  # no warning about our unit
