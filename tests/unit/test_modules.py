"""kbridge.modules: a user's module's parameters, its load log, and why a load failed."""

from __future__ import annotations

import pytest

from kbridge import modules
from kbridge.errors import KbridgeError
from kbridge.targets.base import KmsgRecord

# -- parameters ---------------------------------------------------------------------------

DECLARED = {
    "debug": "int",
    "fail_init": "bool",
    "greeting": "charp",
    "mask": "hexint",
    "ports": "array of ushort",
    "level": "byte",
    "inv": "invbool",
}


@pytest.mark.parametrize(
    ("params", "argv"),
    [
        ({"debug": 1}, ["debug=1"]),
        ({"debug": "-3"}, ["debug=-3"]),
        ({"debug": "0x10"}, ["debug=16"]),
        ({"fail_init": True, "inv": "no"}, ["fail_init=Y", "inv=N"]),
        ({"fail_init": "1"}, ["fail_init=1"]),
        ({"greeting": "hi,there:1"}, ["greeting=hi,there:1"]),
        ({"mask": 255}, ["mask=0xff"]),
        ({"ports": [80, 443]}, ["ports=80,443"]),
        ({"ports": "80,443"}, ["ports=80,443"]),
        ({"level": 255}, ["level=255"]),
    ],
)
def test_valid_parameters(params, argv):
    assert modules.validate_params(params, DECLARED, "drv") == argv


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"nope": 1}, "module drv has no parameter 'nope'"),
        ({"de bug": 1}, "invalid parameter name 'de bug'"),
        ({"debug": "1 fail_init=1"}, "invalid value '1 fail_init=1' for parameter debug (int)"),
        ({"debug": 1 << 31}, "invalid value 2147483648 for parameter debug (int)"),
        ({"debug": True}, "invalid value True for parameter debug (int)"),
        ({"debug": 1.5}, "invalid value 1.5 for parameter debug (int)"),
        ({"level": -1}, "invalid value -1 for parameter level (byte)"),
        ({"fail_init": "maybe"}, "invalid value 'maybe' for parameter fail_init (bool)"),
        ({"greeting": "a b"}, "invalid value 'a b' for parameter greeting (charp)"),
        ({"greeting": 'x"y'}, "invalid value 'x\"y' for parameter greeting (charp)"),
        ({"greeting": "x\ny"}, "invalid value 'x\\ny' for parameter greeting (charp)"),
        ({"greeting": "x" * 1025}, "value for parameter greeting is 1025 characters long"),
        ({"ports": [80, 70000]}, "invalid value 70000 for parameter ports (ushort)"),
    ],
)
def test_invalid_parameters_are_quoted(params, message):
    with pytest.raises(KbridgeError) as e:
        modules.validate_params(params, DECLARED, "drv")
    assert e.value.message.startswith(message)


def test_unknown_parameter_lists_the_declared_ones():
    with pytest.raises(KbridgeError) as e:
        modules.validate_params({"dbg": 1}, {"debug": "int"}, "drv")
    assert e.value.hint == "its parameters (module_param): debug (int)"


def test_parse_param():
    assert modules.parse_param("debug=1") == ("debug", "1")
    assert modules.parse_param("s=a=b") == ("s", "a=b")
    for bad in ("debug", "=1", ""):
        with pytest.raises(KbridgeError, match="expected NAME=VALUE"):
            modules.parse_param(bad)


# -- the load's kernel log and its failures ----------------------------------------------


def rec(text: str, seq: int = 0) -> KmsgRecord:
    return KmsgRecord(6, seq, seq * 1000, text)


def test_the_log_of_a_step_is_what_lies_between_its_markers():
    stream = iter(
        [
            rec("old: backlog"),
            rec("kbridge: insmod x 1 start"),
            None,
            rec("x: hello"),
            rec("x: ready"),
            rec("kbridge: insmod x 1 end"),
            rec("later"),
        ]
    )
    got: list[KmsgRecord] = []
    modules._collect(stream, "kbridge: insmod x 1 start", "kbridge: insmod x 1 end", got)
    assert [r.text for r in got] == ["x: hello", "x: ready"]


def test_failed_init_names_the_errno_and_shows_the_log():
    e = modules._load_error("drv", 19, "", ["drv: no hardware"], left=False)
    assert e.errno == "ENODEV"
    assert e.message == (
        "loading module drv failed: its init function returned -ENODEV (No such device)\n"
        "kernel log of the load:\n  drv: no hardware"
    )
    assert "nothing of it stayed loaded" in e.hint


def test_loader_errors_are_told_apart_from_init_errors():
    e = modules._load_error("drv", 2, "", ["drv: Unknown symbol foo (err -2)"], left=False)
    assert e.errno == "ENOENT"
    assert "does not export" in e.message
    e = modules._load_error("drv", 8, "", [], left=True)
    assert "(the kernel logged nothing)" in e.message and "still listed in /proc/modules" in e.message
