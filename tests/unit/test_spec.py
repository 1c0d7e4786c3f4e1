"""ProbeSpec validation: user text never reaches C unchecked."""

import pytest

from kbridge.arch import ARM64, X86_64
from kbridge.errors import KbridgeError
from kbridge.spec import ArgSpec, make_spec, parse_arg, validate_symbol


@pytest.mark.parametrize("sym", ["ksys_write", "__x64_sys_write", "match_id.isra.0", "_x"])
def test_good_symbols(sym):
    assert validate_symbol(sym) == sym


@pytest.mark.parametrize("sym", ["", "ksys write", 'a"b', "x;rm -rf /", "1abc", "foo.", "foo..bar", "a\\n", "x" * 200])
def test_bad_symbols_are_rejected_with_the_input_quoted(sym):
    with pytest.raises(KbridgeError) as e:
        validate_symbol(sym)
    assert repr(sym)[:20].strip("'\"")[:10] in e.value.message


def test_arg_positions_follow_the_arch():
    assert parse_arg("fd=1", X86_64) == ArgSpec("fd", 1)
    assert parse_arg("x=8", ARM64) == ArgSpec("x", 8)
    with pytest.raises(KbridgeError, match="out of range on x86_64"):
        parse_arg("x=7", X86_64)


@pytest.mark.parametrize("text", ["fd", "fd=", "fd=one", "=1", "int=1", "a-b=1", "ret=1", 'a"=1', "fd=0"])
def test_bad_args(text):
    with pytest.raises(KbridgeError) as e:
        parse_arg(text, X86_64)
    assert text in e.value.message or text.split("=")[0] in e.value.message


def test_spec_rules():
    s = make_spec("vfs_read", {"entry", "ret"}, ["file=1"], X86_64, maxactive=16)
    assert s.kretprobe and not s.kprobe and s.maxactive == 16
    with pytest.raises(KbridgeError, match="no handler"):
        make_spec("vfs_read", set())
    with pytest.raises(KbridgeError, match="given twice"):
        make_spec("vfs_read", {"pre"}, ["a=1", "a=2"])
    with pytest.raises(KbridgeError, match="kretprobe must be at a function entry"):
        make_spec("vfs_read", {"ret"}, offset=4)
    with pytest.raises(KbridgeError, match="maxactive"):
        make_spec("vfs_read", {"ret"}, maxactive=5000)
    with pytest.raises(KbridgeError, match="--comm"):
        make_spec("vfs_read", {"pre"}, comm='a"b')


def test_guest_spec_takes_the_probe_options_and_refuses_others():
    import pytest

    from kbridge.api import Guest
    from kbridge.arch import get_arch

    guest = object.__new__(Guest)  # spec() reads only the arch; no VM is needed
    guest.arch_info = get_arch("arm64")
    spec = guest.spec("ksys_write", ret=True, args={"count": 3}, comm="dd")
    assert spec.handlers == frozenset({"ret"}) and spec.comm == "dd"
    assert guest.spec("ksys_write").handlers == frozenset({"pre"})
    with pytest.raises(TypeError, match="'rett'"):
        guest.spec("ksys_write", rett=True)  # type: ignore[call-arg]
