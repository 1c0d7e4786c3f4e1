"""parse(): one kprobe_events line read as the kernel reads it, or EventSyntaxError with its verdict.

The parser follows the order of the kernel's checks in __trace_kprobe_create() and
trace_probe.c, so when a line has several faults the reported one is the kernel's.
(Over 500 lines for that reason: one reader, in the kernel's order, is easier to hold against
trace_probe.c than pieces of it.)
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import NoReturn

from kbridge.arch import Arch
from kbridge.kprobe_events import model as m
from kbridge.kprobe_events.error_log import EventSyntaxError
from kbridge.kprobe_events.grammar import (
    BASIC_TYPES,
    FETCH_INSN_MAX,
    KRETPROBE_MAXACTIVE_MAX,
    MAX_ARG_NAME_LEN,
    MAX_ARGSTR_LEN,
    MAX_ARRAY_LEN,
    MAX_EVENT_NAME_LEN,
    MAX_TRACE_ARGS,
    PARAM_MAX_STACK,
    RESERVED_FIELD_NAMES,
    STRING_TYPES,
    Grammar,
)
from kbridge.kprobe_events.kstrtox import is_good_name, isdigit, kstrtoll, kstrtouint, kstrtoull, simple_strtoul

_WORD = re.compile(r"[^ \t\n\v\f\r]+")  # argv_split() splits on isspace()
_TOKENS = tuple[tuple[int, str], ...]


def parse(line: str, grammar: Grammar | None = None) -> m.Event:
    """Parse one kprobe_events line as the kernel of GRAMMAR would, or raise EventSyntaxError.

    GRAMMAR (default: bookworm's 6.1 on x86_64) gives the kernel version, the arch's
    register names and the config that matters. A ``#`` comment is dropped first, as
    trace_parse_run_command() does.
    """
    grammar = grammar or Grammar()
    if (col := next((i for i, c in enumerate(line) if c in "\n\r\0\v\f"), None)) is not None:
        # Written with a newline after it, a line holding a newline is two commands, and what a
        # carriage return or NUL means depends on who writes the line: one command, one line.
        raise EventSyntaxError(
            line, None, f"control character {line[col]!r} in the line: kprobe_events takes one command per line", col
        )
    text = line.split("#", 1)[0]
    if (col := next((i for i, c in enumerate(text) if not c.isascii()), None)) is not None:
        # The kernel reads the line as bytes and its isspace() (lib/ctype.c) counts 0xA0 as a
        # space: a non-ASCII character (U+00A0 is C2 A0 in UTF-8) does not mean what it shows.
        raise EventSyntaxError(
            line,
            None,
            f"non-ASCII character {text[col]!r}: the kernel splits "
            "kprobe_events words at byte 0xA0 and names are ASCII",
            col,
        )
    words = tuple((w.start(), w.group()) for w in _WORD.finditer(text))
    # create_or_delete_trace_kprobe() looks at the raw first byte, before
    # argv_split(): " -:foo" is not a removal (and is then rejected).
    if text.startswith("-"):
        return _parse_remove(line, words)
    return _ProbeParser(line, words, grammar).parse()


def dropped_args(line: str) -> int:
    """How many of LINE's fetch arguments the kernel would drop without a word: past MAX_TRACE_ARGS,
    6.1 parses no more (its loop stops at the limit; later kernels refuse the line, TOO_MANY_ARGS)."""
    words = _WORD.findall(line.split("#", 1)[0])
    return max(0, len(words) - 2 - MAX_TRACE_ARGS) if words and not words[0].startswith("-") else 0


def _arg_number(var: str) -> int:
    """N of an "argN" variable (1 or more), else 0."""
    return int(var[3:]) if re.fullmatch(r"arg[1-9]\d{0,3}", var) else 0


def _by_register(n: int, arch: Arch) -> str:
    """Where ARCH's calling convention passes argument N at a function's entry, as a fetch argument."""
    regs = arch.arg_registers
    where = f"%{regs[n - 1]}" if n <= len(regs) else f"$stack{n - 1 - len(regs)}"
    return (
        f"{arch.name} kernels have no $argN (no HAVE_FUNCTION_ARG_ACCESS_API): at a function's entry "
        f"argument {n} is {where} (arguments 1-{len(regs)} in %{regs[0]}-%{regs[-1]}, then $stack0, $stack1...)"
    )


def _unlogged(line: str, why: str) -> NoReturn:
    raise EventSyntaxError(line, None, why)


def _parse_remove(line: str, words: _TOKENS) -> m.RemoveEvent:
    """dyn_event_release(): no error_log entries, only -EINVAL."""
    head = words[0][1]
    if head[1:2] != ":":
        _unlogged(line, "a removal must start with '-:' (-EINVAL, nothing logged)")
    group: str | None
    group, slash, event = head[2:].partition("/")
    if not slash:
        group, event = None, head[2:]
        if not event:
            _unlogged(line, "'-:' needs an event or 'GROUP/' (-EINVAL, nothing logged)")
    return m.RemoveEvent(group, event or None, tuple(w for _, w in words[1:]))


class _ProbeParser:
    """Mirror of __trace_kprobe_create() and the trace_probe.c helpers it calls.

    ``index`` is trace_probe_log.index: which argv word error offsets are
    relative to, exactly as trace_probe_log_set_index() sets it.
    """

    def __init__(self, line: str, words: _TOKENS, grammar: Grammar) -> None:
        self.grammar = grammar
        self.line = line
        self.starts = [start for start, _ in words]
        self.argv = [word for _, word in words]
        self.registers = grammar.arch.tracefs_registers
        self.index = 0
        self.flags_return = False
        self.flags_fentry = False
        self.register_errors: list[str] = []  # from @SYM, raised at registration

    def fail(self, offset: int, error: str, hint: str | None = None) -> NoReturn:
        """__trace_probe_log_err(): caret = offset of argv[index] in the joined command + offset."""
        command = " ".join(self.argv)
        joined = [sum(len(w) + 1 for w in self.argv[:i]) for i in range(len(self.argv))]
        # Past the last word the kernel points "next to the last arg + space".
        kpos = joined[self.index] + offset if self.index < len(self.argv) else len(command) + 1
        word = max(i for i, j in enumerate(joined) if j <= kpos)
        position = self.starts[word] + kpos - joined[word]
        raise EventSyntaxError(self.line, error, self.grammar.message(error), position, command, kpos, hint)

    # -- the command head -----------------------------------------------------

    def parse(self) -> m.ProbeEvent:
        argv = self.argv
        if not argv:
            _unlogged(self.line, "empty command (the kernel ignores it)")
        head = argv[0]
        if head[0] not in "pr":
            _unlogged(self.line, f"{head[0]!r} is not a kprobe command (-EINVAL, nothing logged)")
        if len(argv) < 2:
            _unlogged(self.line, "no probe point given (-EINVAL, nothing logged)")
        kind = head[0]
        colon = head.find(":", 1)
        maxactive = self._maxactive(kind, head, colon)
        # Anything else between p/r and ':' (e.g. "pfoo:") is ignored by 6.1.
        target = self._target(kind)
        self.index = 0
        group, event = (None, None) if colon < 0 else self._event_name(head[colon + 1 :], colon + 1)
        probe = m.ProbeEvent(
            kind="r" if target.pop("is_return") else "p", maxactive=maxactive, group=group, event=event, **target
        )
        args = self._args()
        self._check_symbols_at_register(probe)
        return replace(probe, args=args)

    def _maxactive(self, kind: str, head: str, colon: int) -> int | None:
        if not isdigit(head[1:2]):
            return None
        if kind != "r":
            self.fail(1, "MAXACT_NO_KPROBE")
        digits = head[1:colon] if colon >= 0 else head[1:]
        value = kstrtouint(digits) if len(digits) <= MAX_EVENT_NAME_LEN - 1 else None
        if not value:  # 6.1 rejects 0 although kprobetrace.rst calls it "the default"
            self.fail(1, "BAD_MAXACT")
        if value > KRETPROBE_MAXACTIVE_MAX:
            self.fail(1, "MAXACT_TOO_BIG")
        return value

    def _target(self, kind: str) -> dict:
        """The probe point: MEMADDR, or [MOD:]SYM[+offs][%return]."""
        spec = self.argv[1]
        address = kstrtoull(spec)
        if address is not None:
            # Note: only the symbol branch sets TPARG_FL_RETURN, so 6.1 refuses
            # $retval on "r ADDR" (RETVAL_ON_PROBE) and $argN on any ADDR.
            return {"address": address, "is_return": kind == "r"}
        self.index = 1
        if "/" in spec and ":" in spec:
            _unlogged(self.line, "this looks like a uprobe (-EINVAL, nothing logged)")
        symbol, suffix = spec, False
        pct = symbol.find("%")
        if pct >= 0:
            if symbol[pct:] != "%return":
                self.fail(pct, "BAD_ADDR_SUFFIX")
            symbol, suffix = symbol[:pct], True
        is_return = kind == "r" or suffix
        symbol, offset = self._split_symbol_offset(symbol)
        module, colon, name = symbol.partition(":") if ":" in symbol else ("", "", symbol)
        if not colon and (not name or isdigit(name[0])):
            # Can't be a kernel symbol: number_of_same_symbols() finds 0.
            self.fail(0, "BAD_PROBE_ADDR")
        # kprobe_on_func_entry(): +0, or up to +4 on x86 IBT kernels (past endbr64).
        on_entry = offset <= self.grammar.entry_offset_max()
        if is_return and not on_entry:
            self.fail(0, "BAD_RETPROBE")
        self.flags_return, self.flags_fentry = is_return, on_entry
        return {
            "symbol": name,
            "module": module if colon else None,
            "offset": offset,
            "return_suffix": suffix,
            "is_return": is_return,
        }

    def _split_symbol_offset(self, symbol: str) -> tuple[str, int]:
        """traceprobe_split_symbol_offset() plus the range check around it."""
        cut = min((i for i in (symbol.find("+"), symbol.find("-")) if i >= 0), default=-1)
        if cut < 0:
            return symbol, 0
        offset = kstrtoll(symbol[cut:])
        if offset is None or not 0 <= offset <= 0xFFFFFFFF:
            self.fail(0, "BAD_PROBE_ADDR")
        return symbol[:cut], offset

    def _event_name(self, text: str, offset: int) -> tuple[str | None, str | None]:
        """traceprobe_parse_event_name(); '.' also separates GRP.EVENT in 6.1.y."""
        slash = text.find("/")
        if slash < 0:
            slash = text.find(".")
        group = None
        if slash >= 0:
            if slash == 0:
                self.fail(offset, "NO_GROUP_NAME")
            if slash + 1 > MAX_EVENT_NAME_LEN:
                self.fail(offset, "GROUP_TOO_LONG")
            group = text[:slash]
            if not is_good_name(group, hyphen_ok=self.grammar.hyphen_groups):
                self.fail(offset, "BAD_GROUP_NAME")
            offset += slash + 1
            text = text[slash + 1 :]
        if not text:
            if group is None:
                self.fail(offset, "NO_EVENT_NAME")
            return group, None
        if len(text) >= MAX_EVENT_NAME_LEN:
            self.fail(offset, "EVENT_TOO_LONG")
        if not is_good_name(text):
            self.fail(offset, "BAD_EVENT_NAME")
        return group, text

    # -- arguments -------------------------------------------------------------

    def _args(self) -> tuple[m.FetchArg, ...]:
        names: list[str] = []
        args = []
        # 6.1 parses at most MAX_TRACE_ARGS and silently drops the rest
        # (newer kernels log TOO_MANY_ARGS instead).
        for i, word in enumerate(self.argv[2 : 2 + MAX_TRACE_ARGS]):
            self.index = i + 2
            args.append(self._arg(word, i, names))
        return tuple(args)

    def _arg(self, word: str, i: int, names: list[str]) -> m.FetchArg:
        """traceprobe_parse_probe_arg(): NAME=, then the body."""
        eq = word.find("=")
        if eq >= 0:
            if eq > MAX_ARG_NAME_LEN:
                self.fail(0, "ARG_NAME_TOO_LONG")
            if eq == 0:
                self.fail(0, "NO_ARG_NAME")
            name, body, start = word[:eq], word[eq + 1 :], eq + 1
        else:
            name, body, start = f"arg{i + 1}", word, 0
        if not is_good_name(name):
            self.fail(0, "BAD_ARG_NAME")
        # Auto names count too: "arg2=%ax %bx" clashes on the second arg.
        if name in RESERVED_FIELD_NAMES or name in names:
            self.fail(0, "USED_ARG_NAME")
        names.append(name)
        arg = self._body(body, start)
        return m.FetchArg(arg.fetch, name if eq >= 0 else None, arg.type, arg.array)

    def _body(self, body: str, offset: int) -> m.FetchArg:
        """traceprobe_parse_probe_arg_body(): type, array, fetch, store ops."""
        if len(body) > MAX_ARGSTR_LEN:
            self.fail(offset, "ARG_TOO_LONG")
        if not body:
            self.fail(offset, "NO_ARG_BODY")
        expr, colon, after = body.partition(":")
        tpos = len(expr) + 1 if colon else 0  # "t - arg" in the kernel
        type_text: str | None = after if colon else None
        count = None
        if type_text is not None and "[" in type_text:
            type_text, count = self._array(type_text, offset + tpos)
        if expr in ("$comm", "$COMM") or expr.startswith('\\"'):
            if count is not None or type_text not in (None, "string"):
                # 5.10 and 6.1 return -EINVAL here without logging; 6.8 logs
                # NEED_STRING_TYPE ("tracing/probes: Fix to show a parse error
                # for bad type for $comm"), with the caret on the type.
                if self.grammar.logs_string_type:
                    self.fail(offset + tpos, "NEED_STRING_TYPE")
                _unlogged(self.line, "$comm and immediate strings only take ':string' (-EINVAL, nothing logged by 6.1)")
            type_: str | m.Bitfield | None = type_text
            kind = "string"
        else:
            type_ = self._fetch_type(type_text, offset + tpos)
            kind = type_text or "x64"
        fetch, code = self._fetch(expr, offset, 0)
        store, code = self._store(fetch, kind, count, code, offset, tpos)
        if isinstance(type_, m.Bitfield):
            code = self._check_bitfield(type_, code, offset + tpos)
        if count is not None:
            if store not in ("ST_MEM", "ST_STRING", "ST_USTRING"):
                self.fail(offset + tpos, "BAD_STRING")
            code = self._next(code, offset, "TOO_MANY_OPS")
        return m.FetchArg(fetch, None, type_, count)

    def _array(self, type_text: str, tpos: int) -> tuple[str, int]:
        """TYPE[N]: returns TYPE and N."""
        type_text, _, rest = type_text.partition("[")
        t2 = tpos + len(type_text) + 1
        close = rest.find("]")
        if close < 0:
            self.fail(t2 + len(rest), "ARRAY_NO_CLOSE")
        if close + 1 < len(rest):
            self.fail(t2 + close + 1, "BAD_ARRAY_SUFFIX")
        count = kstrtouint(rest[:close])
        if not count:
            self.fail(t2, "BAD_ARRAY_NUM")
        if count > MAX_ARRAY_LEN:
            self.fail(t2, "ARRAY_TOO_BIG")
        return type_text, count

    def _fetch_type(self, text: str | None, pos: int) -> str | m.Bitfield | None:
        """find_fetch_type(); bitfield syntax proper is checked after the fetch."""
        if text is None:
            return None
        if text.startswith("b"):
            size = kstrtoull(text.partition("/")[2]) if "/" in text else None
            if size not in (8, 16, 32, 64):
                self.fail(pos, "BAD_TYPE")
            width, used = simple_strtoul(text[1:])
            rest = text[1 + used :]
            bit_offset, used2 = simple_strtoul(rest[1:])
            if width == 0 or rest[:1] != "@" or used2 == 0 or rest[1 + used2 : 2 + used2] != "/":
                return m.Bitfield(0, 0, size)  # invalid: reported as BAD_BITFIELD later
            return m.Bitfield(width, bit_offset, size)
        if (
            text not in BASIC_TYPES + STRING_TYPES + ("char",)
            or (text == "symstr" and not self.grammar.symstr)
            or (text == "char" and not self.grammar.char)
        ):
            self.fail(pos, "BAD_TYPE")
        return text

    def _check_bitfield(self, bf: m.Bitfield, code: int, pos: int) -> int:
        """__parse_bitfield_probe_arg()."""
        if bf.width == 0:
            self.fail(pos, "BAD_BITFIELD")
        code = self._next(code, pos, "BAD_BITFIELD")
        if bf.size < bf.width + bf.offset:
            self.fail(pos, "BAD_BITFIELD")
        return code

    def _store(
        self, fetch: m.Fetch, kind: str, count: int | None, code: int, offset: int, tpos: int
    ) -> tuple[str, int]:
        """The store op of traceprobe_parse_probe_arg_body(), with its checks."""
        user = isinstance(fetch, m.Deref) and fetch.user
        deref = isinstance(fetch, (m.Deref, m.Mem, m.SymMem))
        if kind == "symstr":
            if not (isinstance(fetch, (m.Reg, m.Stack, m.Retval, m.Arg)) or (deref and not user)):
                self.fail(offset + tpos, "BAD_SYMSTRING")
        elif kind in STRING_TYPES and not (deref or isinstance(fetch, (m.Imm, m.Comm, m.ImmStr))):
            self.fail(offset + tpos, "BAD_STRING")
        if kind in STRING_TYPES:
            if kind == "symstr" or isinstance(fetch, (m.Imm, m.Comm, m.ImmStr)) or count:
                code = self._next(code, offset, "TOO_MANY_OPS")
            if kind == "ustring" or user:
                return "ST_USTRING", code
            return ("ST_SYMSTR" if kind == "symstr" else "ST_STRING"), code
        if deref:
            return ("ST_UMEM" if user else "ST_MEM"), code
        return "ST_RAW", self._next(code, offset, "TOO_MANY_OPS")

    def _next(self, code: int, pos: int, error: str) -> int:
        """Take the next fetch_insn slot; slot FETCH_INSN_MAX-1 is reserved for END."""
        code += 1
        if code == FETCH_INSN_MAX - 1:
            self.fail(pos, error)
        return code

    def _fetch(self, arg: str, offs: int, code: int) -> tuple[m.Fetch, int]:
        """parse_probe_arg(): the fetch tree and the last fetch_insn slot used."""
        first = arg[:1]
        if first == "$":
            return self._var(arg[1:], offs), code
        if first == "%":
            if arg[1:] not in self.registers:
                self.fail(offs, "BAD_REG_NAME")
            return m.Reg(arg[1:]), code
        if first == "@":
            return self._memory(arg, offs, code)
        if first in ("+", "-"):
            return self._deref(arg, offs, code)
        if first == "\\":
            return self._immediate(arg, offs), code
        if self.grammar.btf_args and self.flags_fentry and re.fullmatch(r"[A-Za-z_]\w*", arg):
            return m.BtfArg(arg), code  # 6.6: an argument by name; the kernel checks BTF
        self.fail(offs, "BAD_FETCH_ARG")

    def _var(self, var: str, offs: int) -> m.Fetch:
        """parse_probe_vars()."""
        if var == "retval":
            if not self.flags_return:
                self.fail(offs, "RETVAL_ON_PROBE")
            return m.Retval()
        if var.startswith("stack"):
            rest = var[5:]
            if not rest:
                return m.StackPtr()
            n = kstrtoull(rest, 10) if isdigit(rest[0]) else None
            if n is None:
                self.fail(offs, "BAD_VAR")
            if n > PARAM_MAX_STACK:
                self.fail(offs, "BAD_STACK_NUM")
            return m.Stack(n)
        if var in ("comm", "COMM"):
            return m.Comm()
        # $argN needs flags == KERNEL|FENTRY: symbol at function entry and not
        # a return probe (6.1 has no $argN on kretprobes or addresses).
        if self.grammar.btf_args and var == "arg*" and self.flags_fentry:
            return m.AllArgs()
        # 6.9 saves the entry's arguments for the return handler, so $argN works there too.
        # Without HAVE_FUNCTION_ARG_ACCESS_API (32-bit arm) there is no $argN at all: BAD_VAR.
        at_entry = self.flags_fentry and (not self.flags_return or self.grammar.args_on_return)
        if self.grammar.args and at_entry and var.startswith("arg"):
            n = kstrtoull(var[3:], 10)
            if n is None:
                self.fail(offs, "BAD_VAR")
            if not n or n > PARAM_MAX_STACK:
                self.fail(offs, "BAD_ARG_NUM")
            return m.Arg(n)
        if not self.grammar.args and (n := _arg_number(var)):
            self.fail(offs, "BAD_VAR", _by_register(n, self.grammar.arch))
        self.fail(offs, "BAD_VAR")

    def _memory(self, arg: str, offs: int, code: int) -> tuple[m.Fetch, int]:
        """'@' case: @ADDR, @+FILEOFFS (uprobes only), @SYM[+|-offs]."""
        if isdigit(arg[1:2]):
            addr = kstrtoull(arg[1:])
            if addr is None:
                self.fail(offs, "BAD_MEM_ADDR")
            fetch: m.Fetch = m.Mem(addr)
        elif arg[1:2] == "+":
            self.fail(offs, "FILE_ON_KPROBE")
        else:
            fetch = self._symbol_memory(arg[1:])
            code = self._next(code, offs, "TOO_MANY_OPS")  # NOP_SYMBOL, then IMM
        return fetch, self._next(code, offs, "TOO_MANY_OPS")  # then DEREF

    def _symbol_memory(self, text: str) -> m.SymMem:
        """@SYM[+|-offs] stays text until registration (traceprobe_update_arg())."""
        cut = min((i for i in (text.find("+"), text.find("-")) if i >= 0), default=-1)
        sym, offs = (text, 0) if cut < 0 else (text[:cut], kstrtoll(text[cut:]))
        if offs is None:
            self.register_errors.append("FAIL_REG_PROBE")  # kstrtol(): -EINVAL
        elif not sym:
            self.register_errors.append("BAD_PROBE_ADDR")  # no symbol "": -ENOENT
        return m.SymMem(sym, offs or 0)

    def _deref(self, arg: str, offs: int, code: int) -> tuple[m.Fetch, int]:
        """'+'/'-' case, including the kernel's own caret arithmetic."""
        user = arg[1:2] == "u"
        if user:
            arg = arg[0] + arg[2:]
        if arg[0] == "+":
            arg = arg[1:]
        brace = arg.find("(")
        if brace < 0:
            self.fail(offs, "DEREF_NEED_BRACE")
        offset = kstrtoll(arg[:brace])
        if offset is None:
            self.fail(offs, "BAD_DEREF_OFFS")
        # offs += (tmp + 1 - arg) + (arg[0] != '-' ? 1 : 0); note that this is
        # one short for "+u"/"-u" derefs, and the kernel's caret is too.
        offs += brace + 1 + (arg[0] != "-")
        inner = arg[brace + 1 :]
        close = inner.rfind(")")
        if close < 0:
            self.fail(offs + len(inner), "DEREF_OPEN_BRACE")
        # Text after the last ')' is silently dropped by 6.1.
        fetch, code = self._fetch(inner[:close], offs, code)
        if isinstance(fetch, (m.Comm, m.ImmStr)):
            self.fail(offs, "COMM_CANT_DEREF")
        code = self._next(code, offs, "TOO_MANY_OPS")
        return m.Deref(offset, fetch, user), code

    def _immediate(self, arg: str, offs: int) -> m.Fetch:
        r"""'\' case: \"string" or \IMM (str_to_immediate())."""
        if arg[1:2] == '"':
            text = arg[2:]
            # The kernel tests str[len - 1]; for `\"` alone that byte is the
            # opening quote itself, so 6.1 accepts it as an empty string.
            if text == "":
                return m.ImmStr("")
            if not text.endswith('"'):
                self.fail(offs + 2 + len(text), "IMMSTR_NO_CLOSE")
            return m.ImmStr(text[:-1])
        num = arg[1:]
        if isdigit(num[:1]):
            value = kstrtoull(num)
        elif num[:1] == "-":
            value = kstrtoll(num)
        elif num[:1] == "+":
            value = kstrtoll(num[1:])
        else:
            value = None
        if value is None:
            self.fail(offs + 1, "BAD_IMM")
        return m.Imm(value)

    # -- registration-time checks that need no kernel ----------------------------

    def _check_symbols_at_register(self, probe: m.ProbeEvent) -> None:
        """traceprobe_update_arg() resolves @SYM when registering; errors land on argv[1].

        -ENOENT is forgiven (the probe waits) when the target is a MOD:SYM or
        an address, see trace_kprobe_module_exist(); only a plain SYM fails.
        """
        self.index = 1
        for error in self.register_errors:
            if error == "FAIL_REG_PROBE" or (probe.symbol is not None and probe.module is None):
                self.fail(0, error)


# --- formatting -------------------------------------------------------------
