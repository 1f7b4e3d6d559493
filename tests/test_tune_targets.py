"""Old CLI target strings (the seeds' ``tvmc`` commands) translated to the JSON dicts TVM 0.27 takes."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from tether.errors import ConfigError
from tether.tune.targets import target_dict, target_json

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("text", "host", "want"),
    [
        ("llvm -mtriple=aarch64-linux-gnu", None, {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}),
        (
            "opencl -device=adreno",
            "llvm -mtriple=aarch64-linux-gnu",
            {"kind": "opencl", "device": "adreno", "host": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}},
        ),
        ("llvm -mattr=+neon,+fp16 -num-cores=4", None, {"kind": "llvm", "mattr": ["+neon", "+fp16"], "num-cores": 4}),
        ("llvm -fast-math", None, {"kind": "llvm", "fast-math": True}),
        ("llvm  -mcpu=cortex-a72 ", None, {"kind": "llvm", "mcpu": "cortex-a72"}),
        ('{"kind": "llvm", "num-cores": 2}', None, {"kind": "llvm", "num-cores": 2}),
        ({"kind": "cuda"}, {"kind": "llvm"}, {"kind": "cuda", "host": {"kind": "llvm"}}),
        ("nvidia/geforce-rtx-3080", None, {"tag": "nvidia/geforce-rtx-3080"}),
    ],
)
def test_translates(text: Any, host: Any, want: dict[str, Any]) -> None:
    assert target_dict(text, host) == want


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("llvm mtriple", 'write the target as JSON, e.g. {"kind": "llvm"}'),
        ("-mtriple=x", "must start with a kind"),
        ("llvm -num-cores=two", "-num-cores=two is not an integer"),
        ("{not json", "is not valid JSON"),
        ('{"mtriple": "x"}', 'a JSON target is an object with a "kind"'),
        ("llvm -mcpu='unclosed", "No closing quotation"),
    ],
)
def test_refuses_with_a_reason(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        target_dict(text)
    assert says in str(info.value)


def test_json_text() -> None:
    assert target_json("llvm -num-cores=2") == '{"kind": "llvm", "num-cores": 2}'


def test_option_types_come_from_tvm_when_it_is_there() -> None:
    tvm = pytest.importorskip("tvm")
    with pytest.raises(ConfigError, match="llvm has no option -bogus"):
        target_dict("llvm -bogus=1")
    with pytest.raises(ConfigError, match="unknown target kind 'frob'"):
        target_dict("frob -x=1")
    # what it makes, TVM takes (opencl's host too)
    made = target_dict("opencl -device=adreno -max_num_threads=256", "llvm -mtriple=aarch64-linux-gnu -mattr=+neon")
    exported = tvm.target.Target(made).export()
    assert exported["device"] == "adreno" and exported["max_num_threads"] == 256
    assert exported["host"]["mtriple"] == "aarch64-linux-gnu" and list(exported["host"]["mattr"]) == ["+neon"]


def test_without_tvm_the_common_options_still_get_their_types(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tvm", None)  # import tvm -> ImportError
    monkeypatch.setitem(sys.modules, "tvm.target", None)
    assert target_dict("llvm -mattr=+a,+b -num-cores=3 -fast-math=false") == {
        "kind": "llvm",
        "mattr": ["+a", "+b"],
        "num-cores": 3,
        "fast-math": False,
    }
