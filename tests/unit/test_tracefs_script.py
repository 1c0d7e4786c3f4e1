"""kbridge/guest/tracefs.sh's output as the host reads it, and its arguments (never its text) carry the user's input."""

from __future__ import annotations

from kbridge.mechanisms.tracefs import script


def test_verdict_and_tagged_files() -> None:
    text = (
        "define-failed 2\n"
        "W sh: write error: Invalid argument\n"
        "E0 [  1.0] trace_kprobe: error: Invalid argument\n"
        "E1 [  2.0] trace_kprobe: error: Invalid fetch argument\n"
        "S0 cpu0 entries: 3\n"
        "S0 cpu0 overrun: 0\n"
        "S0 cpu1 overrun: 4\n"
        "L ffffffff81367680  k  ksys_write+0x0    [FTRACE]\n"
    )
    out = script.parse(text)
    assert out.verdict == "define-failed 2"
    assert out.text("W") == "sh: write error: Invalid argument\n"
    assert out.stats("S0") == {"cpu0": "entries: 3\noverrun: 0\n", "cpu1": "overrun: 4\n"}
    assert out.text("L").startswith("ffffffff81367680")
    assert out.text("K") == ""


def test_the_script_text_is_fixed_and_the_input_an_argument() -> None:
    hostile = 'p:x ksys_write a=$(reboot) "; rm -rf /"'
    argv = script.argv("arm", "/run/kbridge/tracefs-1", hostile)
    assert argv[:3] == ["/bin/busybox", "sh", "-c"] and argv[3] == script.SCRIPT.read_text()
    assert argv[-1] == hostile and hostile not in argv[3]
