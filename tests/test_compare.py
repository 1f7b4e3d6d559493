"""``tether compare`` and bench baselines: Hodges-Lehmann estimates with rank-test intervals, verdicts, ABBA
rounds on real devices, saved results against new ones, device fingerprints."""

from __future__ import annotations

import json
import math
import random
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from tether.cli import main
from tether.client.baseline import Entry, check_baseline, compare_saved, fingerprint, load_entries
from tether.client.compare import Comparison, compare_blocks, is_regression, overall
from tether.client.stats import ratio_ci
from tether.errors import ConfigError
from tether.tracker import TrackerThread

pytestmark = pytest.mark.timeout(120)

SVG = "{http://www.w3.org/2000/svg}"


def _samples(rng: random.Random, n: int, scale: float = 1.0, sigma: float = 0.1) -> list[float]:
    """Skewed like timings: a lognormal around ``scale``."""
    return [scale * rng.lognormvariate(0, sigma) for _ in range(n)]


def _singles(samples: list[float]) -> list[list[float]]:
    return [[s] for s in samples]


# -- statistics ------------------------------------------------------------------------------------------


def test_the_interval_covers_the_true_ratio_most_of_the_time() -> None:
    """B's distribution is A's times 1.5: the ratio of medians is 1.5; 95 % intervals cover it about
    19 times in 20 (seeded draws: the same on every run)."""
    rng = random.Random(7)
    covered = 0
    trials = 40
    for _ in range(trials):
        a, b = _samples(rng, 40), _samples(rng, 40, 1.5)
        ratio, (lo, hi) = ratio_ci([(_singles(a), _singles(b), False)])
        assert lo <= ratio <= hi
        covered += lo <= 1.5 <= hi
    assert covered >= 34, covered  # P(fewer than 34 of 40 | 95 %) < 1 %


def test_rounds_are_resampled_as_blocks_paired_across_a_and_b() -> None:
    """Each round shifts both models alike (drift): paired blocks see through it, the interval stays
    narrow around the truth; the same samples unpaired give a wider one."""
    rng = random.Random(3)
    a_rounds, b_rounds = [], []
    for _ in range(10):
        drift = rng.uniform(0.5, 2.0)
        a_rounds.append(_samples(rng, 5, drift, 0.02))
        b_rounds.append(_samples(rng, 5, 2 * drift, 0.02))
    ratio, (lo, hi) = ratio_ci([(a_rounds, b_rounds, True)])
    assert lo <= 2.0 <= hi and 1.9 < ratio < 2.1
    _, (ulo, uhi) = ratio_ci([(a_rounds, b_rounds, False)])
    assert uhi - ulo > hi - lo
    assert ratio_ci([(a_rounds[:5], b_rounds[:5], True)])[1] == (0.0, math.inf)  # 5 rounds cannot tell at 95 %
    assert ratio_ci([(a_rounds[:6], b_rounds[:6], True)])[1][0] > 1  # 6 can: all 6 agree


def test_same_distribution_is_no_significant_difference() -> None:
    rng = random.Random(11)
    c = compare_blocks(_singles(_samples(rng, 50)), _singles(_samples(rng, 50)), paired=False)
    assert c.ci[0] < 1 < c.ci[1] and not c.significant and c.direction == "same"
    assert c.verdict().startswith("no significant difference (") and " % .. +" in c.verdict()
    assert not is_regression(c, 0.0)


def test_twice_the_time_is_significant_with_the_right_sign() -> None:
    rng = random.Random(5)
    a, b = _singles(_samples(rng, 30)), _singles(_samples(rng, 30, 2.0))
    slower = compare_blocks(a, b, paired=False)
    assert slower.direction == "slower" and slower.ci[0] > 1 and 1.8 < slower.ratio < 2.2
    assert slower.verdict().startswith("B is ") and "% slower (" in slower.verdict()
    assert is_regression(slower, 0.05) and not is_regression(slower, 2.0)  # 100 % slower is not over 200 %
    faster = compare_blocks(b, a, paired=False)
    assert faster.direction == "faster" and faster.ci[1] < 1
    assert faster.verdict("new").startswith("new is ") and "% faster (" in faster.verdict()
    assert not is_regression(faster, 0.0)


def test_a_significant_change_below_the_minimum_effect_is_no_difference() -> None:
    c = Comparison(1.004, (1.002, 1.006), 0.95)
    assert not c.significant and c.verdict() == "no significant difference (+0.2 % .. +0.6 %)"
    assert Comparison(1.004, (1.002, 1.006), 0.95, min_effect=0.0).direction == "slower"
    text = Comparison(0.927, (0.914, 0.941), 0.95).verdict()
    assert text == "B is 7.3 % faster (5.9-8.6 %)"


def test_overall_pools_devices_and_counts_those_that_agree() -> None:
    rng = random.Random(2)
    groups = [(_singles(_samples(rng, 30)), _singles(_samples(rng, 30, 1.3)), False) for _ in range(3)]
    per_device = [compare_blocks(a, b, paired=False) for a, b, _ in groups]
    pooled = overall(groups, per_device)
    assert pooled.direction == "slower" and pooled.devices == 3
    assert pooled.verdict().endswith(f", {pooled.agree} devices agree" if pooled.agree == 3 else "devices agree")
    same = Comparison(1.0, (0.99, 1.01), 0.95)
    mixed = overall(groups, [*per_device[:2], same])
    assert mixed.agree == 2 and mixed.verdict().endswith(", 2 of 3 devices agree")


def test_ratio_ci_refuses_what_it_cannot_compare() -> None:
    with pytest.raises(ValueError, match="no samples"):
        ratio_ci([([], [[1.0]], False)])
    with pytest.raises(ValueError, match="positive"):
        ratio_ci([([[0.0]], [[1.0]], False)])
    with pytest.raises(ValueError, match="paired"):
        ratio_ci([([[1.0], [2.0]], [[1.0]], True)])


# -- fingerprints and saved results ------------------------------------------------------------------------

FACTS = {
    "os": "Linux",
    "release": "6.1.0",
    "arch": "aarch64",
    "cpu": "Cortex-A76",
    "cores": 4,
    "memory": 8 << 30,
    "accelerators": [{"kind": "opencl", "model": "mali0", "bus": "x"}],
    "python": "3.11.7",
    "backends": {"onnxruntime": "1.17.0", "tvm": None},
    "plugins": {},
}


def test_fingerprint_is_the_device_kind_not_its_address_or_software_around() -> None:
    fp = fingerprint(FACTS)
    assert len(fp) == 16 and fp == fingerprint(dict(FACTS))
    assert fingerprint({**FACTS, "release": "6.2.0", "python": "3.12.1"}) == fp  # kernel, Python: left out
    assert fingerprint({**FACTS, "backends": {"tvm": None, "onnxruntime": "1.17.0"}}) == fp  # order does not matter
    assert fingerprint({**FACTS, "backends": {"onnxruntime": "1.18.0", "tvm": None}}) != fp  # a new runtime
    assert fingerprint({**FACTS, "cores": 8}) != fp and fingerprint({**FACTS, "cpu": "Cortex-A55"}) != fp


def test_check_baseline_statuses() -> None:
    rng = random.Random(9)
    base = [Entry("m.onnx", "f1", samples=_samples(rng, 30)), Entry("n.onnx", "f1", samples=_samples(rng, 30))]
    new = [
        Entry("m.onnx", "f1", devices=["d"], samples=_samples(rng, 30, 1.5)),
        Entry("n.onnx", "f1", devices=["d"], samples=_samples(rng, 30, 0.5)),
        Entry("m.onnx", "f2", devices=["e"], samples=_samples(rng, 30)),
    ]
    rows = check_baseline(base, new, threshold=0.05)
    assert [r.status for r in rows] == ["regression", "faster", "no baseline"]
    assert rows[0].text(0.05).startswith("REGRESSION ") and rows[2].text(0.05) == "no baseline"
    assert check_baseline(base, new[:1], threshold=1.0)[0].status == "slower"  # 50 % slower: within 100 %


def test_saved_results_with_one_model_each_are_compared_whatever_their_names() -> None:
    rng = random.Random(4)
    old = [Entry("a.onnx", "f1", samples=_samples(rng, 30)), Entry("a.onnx", "f2", samples=_samples(rng, 30))]
    new = [Entry("b.onnx", "f1", samples=_samples(rng, 30, 2)), Entry("b.onnx", "f3", samples=_samples(rng, 30))]
    (pair,) = compare_saved(old, new)
    assert (pair.a, pair.b, pair.unmatched) == ("a.onnx", "b.onnx", ["f2", "f3"])
    assert len(pair.devices) == 1 and pair.overall is not None and pair.overall.direction == "slower"


def test_load_entries_names_a_file_it_cannot_read(tmp_path: Path) -> None:
    for text in ("{", '{"format": "other"}', '{"format": "tether-baseline/1", "entries": [{"model": "m"}]}'):
        (tmp_path / "x.json").write_text(text)
        with pytest.raises(ConfigError, match=r"x\.json"):
            load_entries(tmp_path / "x.json")


# -- on devices -----------------------------------------------------------------------------------------------


def _chain(path: Path, matmuls: int) -> Path:
    """``x @ W @ W ...``: ``matmuls`` MatMuls of 256x256 by 256x256 (each ~34 MFLOP)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = 256
    w = (np.random.default_rng(0).standard_normal((n, n)) / np.sqrt(n)).astype("float32")
    nodes, prev = [], "x"
    for i in range(matmuls):
        out = "y" if i == matmuls - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, "w"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
        [numpy_helper.from_array(w, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=9), str(path))
    return path


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    return _chain(tmp_path / "light.onnx", 6), _chain(tmp_path / "heavy.onnx", 12)


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["--log-level", "WARNING", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _verdict(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("verdict"))


TIMING = ["--rounds", "10", "--number", "3", "--repeat", "4", "--quiet"]


def test_compare_says_the_heavier_model_is_slower_on_every_device(
    capsys: pytest.CaptureFixture[str],
    tracker: TrackerThread,
    device_server: Any,
    models: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    """Two servers of the same machine on different ports: two devices with one fingerprint."""
    servers = [device_server(key="ab", tracker=(tracker.host, tracker.port)) for _ in range(2)]
    light, heavy = models
    request = ["--tracker", f"{tracker.host}:{tracker.port}", "--key", "ab", "--timeout", "60", "--all-devices"]
    out_json, out_svg = tmp_path / "c.json", tmp_path / "c.svg"
    code, out, err = _cli(
        capsys, "compare", str(light), str(heavy), *request, *TIMING, "--fail-if-slower", "5%",
        "--json", str(out_json), "--plot", str(out_svg),
    )  # fmt: skip
    assert code == 1, out + err
    assert "% slower (" in _verdict(out) and "devices agree" in _verdict(out), out
    assert "FAIL: B is slower than A by more than 5 %" in out
    doc = json.loads(out_json.read_text())
    assert (doc["format"], doc["a"], doc["b"], doc["rounds"], doc["order"]) == (
        "tether-compare/1", "light.onnx", "heavy.onnx", 10, "ABBA",
    )  # fmt: skip
    assert doc["failed"] is True and doc["fail_if_slower"] == 0.05
    assert doc["overall"]["direction"] == "slower" and doc["overall"]["ci"][0] > 1 and doc["overall"]["devices"] == 2
    devices = doc["devices"]
    assert sorted(d["device"] for d in devices) == sorted(f"127.0.0.1:{s.port}" for s in servers)
    assert len({d["fingerprint"] for d in devices}) == 1  # the address is not part of it
    for d in devices:  # (each device alone has half the rounds: its verdict is not asserted, its estimate is)
        assert d["error"] is None and d["facts"]["cores"]
        assert len(d["a"]["rounds"]) == len(d["b"]["rounds"]) == 10 and len(d["a"]["samples"]) == 40
        assert d["a"]["stats"]["n"] == 40 and d["b"]["stats"]["n"] == 40
        c = d["comparison"]
        assert c["ratio"] > 1 and c["ci"][0] <= c["ratio"] <= c["ci"][1] and c["verdict"] == c["verdict"].strip()
        assert c["direction"] in ("slower", "same") and c["devices"] == 1
    svg = ET.parse(out_svg).getroot()
    assert len(svg.findall(f".//{SVG}g[@class='model']")) == 2  # a group per device
    assert len(svg.findall(f".//{SVG}g[@class='row']")) == 4  # A and B in each
    assert len(svg.findall(f".//{SVG}circle")) == 4 * 40
    # the light one as B: faster, and the gate passes
    code, out, _ = _cli(capsys, "compare", str(heavy), str(light), *request, *TIMING, "--fail-if-slower", "5")
    assert code == 0 and "% faster (" in _verdict(out) and "FAIL" not in out


def test_the_same_model_twice_is_no_significant_difference(
    capsys: pytest.CaptureFixture[str], tracker: TrackerThread, device_server: Any, models: tuple[Path, Path]
) -> None:
    """At 95 % an interval misses no change one time in twenty by design; at 99.9 % (12 rounds) this test
    would fail about once in a thousand runs, not once in twenty."""
    device_server(key="aa", tracker=(tracker.host, tracker.port))
    light, _ = models
    request = ["--tracker", f"{tracker.host}:{tracker.port}", "--key", "aa", "--timeout", "60"]
    sure = ["--confidence", "0.999", "--rounds", "12", "--fail-if-slower", "5%"]
    code, out, err = _cli(capsys, "compare", str(light), str(light), *request, *TIMING, *sure)
    assert code == 0, out + err
    assert _verdict(out).startswith("verdict: no significant difference ("), out


def test_a_baseline_round_trip_finds_a_regression(
    capsys: pytest.CaptureFixture[str],
    tracker: TrackerThread,
    device_server: Any,
    models: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    """Save a baseline for model.onnx; the same model again: no regression; model.onnx replaced by one
    doing four times the work: a regression, exit 1; a model without a baseline is reported, not a failure.

    Unlike ``compare``'s interleaved rounds, a baseline and a new run are minutes (here: seconds) apart,
    and this machine's load between them is not ours to choose: the same model is checked with a wide
    threshold, and the heavier one does four times the work, not twice."""
    device_server(key="base", tracker=(tracker.host, tracker.port))
    light, _ = models
    heavy = _chain(tmp_path / "heavier.onnx", 24)
    model, other = tmp_path / "model.onnx", tmp_path / "other.onnx"
    model.write_bytes(light.read_bytes())
    other.write_bytes(light.read_bytes())
    base = tmp_path / "baseline.json"
    request = ["--tracker", f"{tracker.host}:{tracker.port}", "--key", "base", "--timeout", "60", "--quiet"]
    timing = ["--number", "3", "--repeat", "30"]
    code, out, err = _cli(capsys, "bench", str(model), *request, *timing, "--save-baseline", str(base))
    assert code == 0 and f"baseline saved to {base}: 1 model/device entries" in out, out + err
    doc = json.loads(base.read_text())
    (entry,) = doc["entries"]
    assert doc["format"] == "tether-baseline/1" and entry["model"] == "model.onnx" and len(entry["samples"]) == 30
    assert entry["stats"]["n"] == 30 and entry["fingerprint"] == fingerprint(entry["facts"])
    code, out, err = _cli(
        capsys, "bench", str(model), *request, *timing, "--baseline", str(base), "--regression-threshold", "50%"
    )
    assert code == 0 and "REGRESSION" not in out and "(regression: significantly slower by over 50 %)" in out, out + err
    model.write_bytes(heavy.read_bytes())
    code, out, err = _cli(
        capsys, "bench", str(model), str(other), *request, *timing, "--baseline", str(base),
        "--regression-threshold", "5%", "--json", str(tmp_path / "new.json"),
    )  # fmt: skip
    assert code == 1, out + err
    (row,) = [line for line in out.splitlines() if line.startswith("model.onnx") and entry["fingerprint"] in line]
    assert "REGRESSION " in row and "% slower (" in row and "(over 5 %)" in row
    assert any(line.startswith("other.onnx") and line.endswith("no baseline") for line in out.splitlines()), out
    assert "FAIL: a regression against the baseline" in out
    # the saved results offline: the baseline against the new bench --json
    code, out, _ = _cli(capsys, "compare", "--saved", str(base), str(tmp_path / "new.json"), "--fail-if-slower", "5%")
    assert code == 1 and "verdict model.onnx vs model.onnx: B is " in out and "% slower" in out


def test_usage_mistakes_are_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    (tmp_path / "bad.json").write_text("[1, 2]")
    cases = [
        (["compare", str(model), str(model)], "needs --key"),
        (["compare", str(model), str(model), "--key", "k", "--fail-if-slower", "x"], "expected a percentage"),
        (["compare", str(model), str(model), "--key", "k", "--rounds", "5"], "--rounds 5 cannot show a difference"),
        (["compare", str(model), str(model), "--key", "k", "--confidence", "1"], "expected a confidence"),
        (["compare", str(model), str(tmp_path / "none.onnx"), "--key", "k"], "no file"),
        (["compare", "--saved", str(tmp_path / "bad.json"), str(tmp_path / "bad.json")], "bad.json"),
        (["bench", str(model), "--key", "k", "--baseline", str(tmp_path / "none.json")], "no file"),
        (["bench", str(model), "--key", "k", "--regression-threshold", "-1"], "expected a percentage"),
    ]
    for args, message in cases:
        code, _, err = _cli(capsys, *args)
        assert (code, err.count("\n")) == (2, 1) and message in err, (args, err)
