"""The kprobe_events grammar of Linux 6.1 and its drift in 5.10, 6.12 and 7.x, with the kernel's own verdicts.

`parse()` turns one line written to ``/sys/kernel/tracing/kprobe_events`` into a
typed model (`model`), `format()` turns it back. Invalid lines raise
`EventSyntaxError` carrying the kernel's error class, message and caret position,
computed the way the kernel computes them, so a line can be checked offline before
it reaches a guest. A `Grammar` (kernel version, Arch, IBT, BTF arguments) selects
what differs between kernels; each difference is tested against the error_log of
Debian's kernels (tests/unit/data/error_log/).

Reference: linux-6.1.119 (the Debian bookworm kernel line), files
``kernel/trace/trace_kprobe.c`` (``__trace_kprobe_create``),
``kernel/trace/trace_probe.c`` (``traceprobe_parse_probe_arg``,
``parse_probe_arg``, ``parse_probe_vars``, ``traceprobe_parse_event_name``,
``__trace_probe_log_err``), ``kernel/trace/trace_probe.h`` (``ERRORS``),
``kernel/trace/trace_dynevent.c`` (``dyn_event_release``) and
``kernel/trace/trace.c`` (``tracing_log_err``, ``trace_parse_run_command``).

What is not checked offline, because it needs the running kernel: whether a
symbol exists or is unique (``BAD_PROBE_ADDR``/``NON_UNIQ_SYMBOL``), instruction
boundaries (``BAD_INSN_BNDRY``), notrace functions, and name clashes with
existing events (``EVENT_EXIST``, ``DIFF_PROBE_TYPE``, ``SAME_PROBE``...).
Positions are character offsets; the kernel counts bytes, which only differs
for non-ASCII input, which no valid command contains.

Files: grammar (limits, error classes, Grammar), model (the dataclasses), parser,
format, error_log (EventSyntaxError, tracing/error_log), kstrtox (the kernel's
number and name readers).
"""

from kbridge.kprobe_events.error_log import ErrorLogEntry, EventSyntaxError, parse_error_log
from kbridge.kprobe_events.format import format, format_arg, format_fetch  # noqa: A004 - the name the API promises
from kbridge.kprobe_events.grammar import DEFAULT_GROUP, ERRORS, MAX_TRACE_ARGS, Grammar, grammar_for
from kbridge.kprobe_events.model import (
    AllArgs,
    Arg,
    Bitfield,
    BtfArg,
    Comm,
    Deref,
    Event,
    Fetch,
    FetchArg,
    Imm,
    ImmStr,
    Mem,
    ProbeEvent,
    Reg,
    RemoveEvent,
    Retval,
    Stack,
    StackPtr,
    SymMem,
    default_event_name,
)
from kbridge.kprobe_events.parser import dropped_args, parse

__all__ = [
    "DEFAULT_GROUP",
    "ERRORS",
    "MAX_TRACE_ARGS",
    "AllArgs",
    "Arg",
    "Bitfield",
    "BtfArg",
    "Comm",
    "Deref",
    "ErrorLogEntry",
    "Event",
    "EventSyntaxError",
    "Fetch",
    "FetchArg",
    "Grammar",
    "Imm",
    "ImmStr",
    "Mem",
    "ProbeEvent",
    "Reg",
    "RemoveEvent",
    "Retval",
    "Stack",
    "StackPtr",
    "SymMem",
    "default_event_name",
    "dropped_args",
    "format",
    "format_arg",
    "format_fetch",
    "grammar_for",
    "parse",
    "parse_error_log",
]
