"""Raw bcc perf events (as the guest runner sends them) decoded on the host."""

from __future__ import annotations

import base64
import ctypes
import importlib.util

from kbridge.mechanisms.bpf import RUNNER_SOURCE
from kbridge.mechanisms.bpf.collect import Decoder, messages, parse_hit


class KbEvent(ctypes.Structure):  # struct kb_event of kmod/bpf.c.j2 with two arguments, as bcc builds it
    _fields_ = [
        ("handler", ctypes.c_uint),
        ("pid", ctypes.c_uint),
        ("tid", ctypes.c_uint),
        ("cpu", ctypes.c_uint),
        ("ts", ctypes.c_ulonglong),
        ("ret", ctypes.c_longlong),
        ("addr", ctypes.c_ulonglong),
        ("ip", ctypes.c_ulonglong),
        ("flags", ctypes.c_ulonglong),
        ("duration", ctypes.c_ulonglong),
        ("args", ctypes.c_ulonglong * 2),
        ("comm", ctypes.c_char * 16),
    ]


class _Table:
    def event(self, data: object) -> KbEvent:
        return KbEvent.from_buffer_copy(bytes(data))  # type: ignore[call-overload]


def _runner():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bpf_runner", RUNNER_SOURCE)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_raw_hit_round_trip() -> None:
    layout = _runner().layout_of(_Table())
    ev = KbEvent(handler=3, pid=42, tid=43, cpu=1, ts=1_500_000_000, ret=-14, args=(1, 7), comm=b"dd")
    line = "Habcd " + base64.b64encode(bytes(ev)).decode()
    msgs = list(messages(iter([line, "Hother " + line[6:], None, '{"ev": "end", "run": "abcd"}']), "abcd"))
    assert msgs[0] is not None and msgs[0]["ev"] == "hit"
    assert msgs[1] is None and msgs[2] == {"ev": "end", "run": "abcd"}  # the other run's hit is skipped
    hit = parse_hit(msgs[0], "vfs_read", Decoder(layout, ["fd", "count"], "vfs_read"))
    assert (hit.handler, hit.pid, hit.tid, hit.cpu, hit.comm) == ("ret", 42, 43, 1, "dd")
    assert hit.args == {"fd": 1, "count": 7} and hit.retval == -14 and hit.timestamp == 1.5
