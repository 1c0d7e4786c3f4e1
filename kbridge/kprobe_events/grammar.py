"""What a kernel accepts in kprobe_events: its limits, its error classes and the Grammar of one kernel.

Reference: linux-6.1.119, kernel/trace/trace_probe.h (ERRORS, the limits) and
trace_kprobe.c; later kernels' additions are marked where they differ. Register
names come from the Arch (regoffset_table[]).
"""

from __future__ import annotations

from dataclasses import dataclass

from kbridge import kernels
from kbridge.arch import X86_64, Arch

# --- limits, from linux-6.1 -------------------------------------------------

MAX_EVENT_NAME_LEN = 64  # kernel/trace/trace.h
MAX_TRACE_ARGS = 128  # trace_probe.h; 6.1 silently ignores args past this
MAX_ARGSTR_LEN = 63  # trace_probe.h: longest FETCHARG body (after NAME=)
MAX_ARRAY_LEN = 64
MAX_ARG_NAME_LEN = 32
FETCH_INSN_MAX = 16  # trace_probe.h: fetch + deref*N + store + mod + end
KRETPROBE_MAXACTIVE_MAX = 4096  # trace_kprobe.c
# PARAM_MAX_STACK = THREAD_SIZE / sizeof(long): 16 KiB stacks of 8-byte words on x86_64
# (page_64_types.h, no KASAN) and arm64 (memory.h, 4 KiB pages), 8 KiB of 4-byte words on
# 32-bit arm (thread_info.h, THREAD_SIZE_ORDER 1): 2048 on all three.
PARAM_MAX_STACK = 16384 // 8
DEFAULT_GROUP = "kprobes"  # KPROBE_EVENT_SYSTEM

# trace_probe.h ERRORS, in order, as in linux-6.1.119 (NON_UNIQ_SYMBOL and
# BAD_SYMSTRING are 6.1.y stable backports; BTF/fprobe/tprobe errors such as
# TOO_MANY_ARGS or NOSUP_BTFARG only exist from 6.5 on).
ERRORS: dict[str, str] = {
    "FILE_NOT_FOUND": "Failed to find the given file",
    "NO_REGULAR_FILE": "Not a regular file",
    "BAD_REFCNT": "Invalid reference counter offset",
    "REFCNT_OPEN_BRACE": "Reference counter brace is not closed",
    "BAD_REFCNT_SUFFIX": "Reference counter has wrong suffix",
    "BAD_UPROBE_OFFS": "Invalid uprobe offset",
    "MAXACT_NO_KPROBE": "Maxactive is not for kprobe",
    "BAD_MAXACT": "Invalid maxactive number",
    "MAXACT_TOO_BIG": "Maxactive is too big",
    "BAD_PROBE_ADDR": "Invalid probed address or symbol",
    "NON_UNIQ_SYMBOL": "The symbol is not unique",
    "BAD_RETPROBE": "Retprobe address must be an function entry",
    "BAD_ADDR_SUFFIX": "Invalid probed address suffix",
    "NO_GROUP_NAME": "Group name is not specified",
    "GROUP_TOO_LONG": "Group name is too long",
    "BAD_GROUP_NAME": "Group name must follow the same rules as C identifiers",
    "NO_EVENT_NAME": "Event name is not specified",
    "EVENT_TOO_LONG": "Event name is too long",
    "BAD_EVENT_NAME": "Event name must follow the same rules as C identifiers",
    "EVENT_EXIST": "Given group/event name is already used by another event",
    "RETVAL_ON_PROBE": "$retval is not available on probe",
    "BAD_STACK_NUM": "Invalid stack number",
    "BAD_ARG_NUM": "Invalid argument number",
    # Debian's 6.1.y (checked on 6.1.0-56, 6.1.192) prints the fixed spelling;
    # older kernels said "Invalid $-valiable specified", still mapped below.
    "BAD_VAR": "Invalid $-variable specified",
    "BAD_REG_NAME": "Invalid register name",
    "BAD_MEM_ADDR": "Invalid memory address",
    "BAD_IMM": "Invalid immediate value",
    "IMMSTR_NO_CLOSE": "String is not closed with '\"'",
    "FILE_ON_KPROBE": "File offset is not available with kprobe",
    "BAD_FILE_OFFS": "Invalid file offset value",
    "SYM_ON_UPROBE": "Symbol is not available with uprobe",
    "TOO_MANY_OPS": "Dereference is too much nested",
    "DEREF_NEED_BRACE": "Dereference needs a brace",
    "BAD_DEREF_OFFS": "Invalid dereference offset",
    "DEREF_OPEN_BRACE": "Dereference brace is not closed",
    "COMM_CANT_DEREF": "$comm can not be dereferenced",
    "BAD_FETCH_ARG": "Invalid fetch argument",
    "ARRAY_NO_CLOSE": "Array is not closed",
    "BAD_ARRAY_SUFFIX": "Array has wrong suffix",
    "BAD_ARRAY_NUM": "Invalid array size",
    "ARRAY_TOO_BIG": "Array number is too big",
    "BAD_TYPE": "Unknown type is specified",
    "BAD_STRING": "String accepts only memory argument",
    "BAD_SYMSTRING": "Symbol String doesn't accept data/userdata",
    "BAD_BITFIELD": "Invalid bitfield",
    "ARG_NAME_TOO_LONG": "Argument name is too long",
    "NO_ARG_NAME": "Argument name is not specified",
    "BAD_ARG_NAME": "Argument name must follow the same rules as C identifiers",
    "USED_ARG_NAME": "This argument name is already used",
    "ARG_TOO_LONG": "Argument expression is too long",
    "NO_ARG_BODY": "No argument expression",
    "BAD_INSN_BNDRY": "Probe point is not an instruction boundary",
    "FAIL_REG_PROBE": "Failed to register probe event",
    "DIFF_PROBE_TYPE": "Probe type is different from existing probe",
    "DIFF_ARG_TYPE": "Argument type or name is different from existing probe",
    "SAME_PROBE": "There is already the exact same probe event",
    "NO_EVENT_INFO": "This requires both group and event name to attach",
    "BAD_ATTACH_EVENT": "Attached event does not exist",
    "BAD_ATTACH_ARG": "Attached event does not have this field",
    "NO_EP_FILTER": "No filter rule after 'if'",
}

#: Message text (as printed in error_log) -> error class name.
ERROR_CLASSES: dict[str, str] = {text: name for name, text in ERRORS.items()}
# Messages as older kernels spelled them -> class.
OLD_MESSAGES: dict[str, str] = {"Invalid $-valiable specified": "BAD_VAR"}

# Error classes later kernels added, and messages they reworded (seen in 6.12's
# and 7.2's error_log).
LATER_ERRORS: dict[str, str] = {
    "NEED_STRING_TYPE": "$comm and immediate-string only accepts string type",
}
ERROR_CLASSES.update({text: name for name, text in LATER_ERRORS.items()})
OLD_MESSAGES["Maxactive is only for function exit"] = "MAXACT_NO_KPROBE"


BASIC_TYPES = ("u8", "u16", "u32", "u64", "s8", "s16", "s32", "s64", "x8", "x16", "x32", "x64", "symbol")
STRING_TYPES = ("string", "ustring", "symstr")  # symstr: 6.1.y backport
# Field names a probe argument may not take (reserved_field_names[]).
RESERVED_FIELD_NAMES = frozenset(
    [
        "common_type",
        "common_flags",
        "common_preempt_count",
        "common_pid",
        "common_tgid",
        "__probe_ip",
        "__probe_ret_ip",
        "__probe_func",
    ]
)


@dataclass(frozen=True)
class Grammar:
    """What one kernel accepts in kprobe_events: its version, arch and the config that matters.

    Each rule below was checked against the error_log of Debian's kernels (5.10, 6.1,
    6.12, 7.2 on x86_64 and arm64), kept in tests/unit/data/error_log/.
    """

    version: tuple[int, int] = (6, 1)
    arch: Arch = X86_64
    ibt: bool = False  # CONFIG_X86_KERNEL_IBT: functions start with endbr64
    btf_args: bool = False  # CONFIG_PROBE_EVENTS_BTF_ARGS: $arg*, arguments by name

    @property
    def symstr(self) -> bool:
        """':symstr' (6.2, in Debian's 6.1.y as a stable backport; 5.10 says BAD_TYPE)."""
        return self.version >= (6, 1)

    @property
    def char(self) -> bool:
        """':char' (6.5)."""
        return self.version >= (6, 5)

    @property
    def hyphen_groups(self) -> bool:
        """'-' in group names (a 6.1.y backport; 5.10 says BAD_GROUP_NAME)."""
        return self.version >= (6, 1)

    @property
    def args(self) -> bool:
        """$argN at all: CONFIG_HAVE_FUNCTION_ARG_ACCESS_API, which x86_64 and arm64 select and 32-bit
        arm does not (6.1 armmp logs BAD_VAR "Invalid $-variable specified" at the '$')."""
        return self.arch.arg_access_api

    @property
    def args_on_return(self) -> bool:
        """$argN in a return probe (6.9: the entry's arguments are saved for the exit)."""
        return self.version >= (6, 9)

    @property
    def logs_string_type(self) -> bool:
        """'$comm:u8' logged as NEED_STRING_TYPE (6.8); before, -EINVAL with no log."""
        return self.version >= (6, 8)

    def entry_offset_max(self) -> int:
        """The largest SYM+offs that is still the function entry (arch_kprobe_on_func_entry()).

        x86 with IBT: +4, past endbr64 (6.2 on, Debian enables it from trixie's 6.12);
        otherwise, and always on arm64 (whose +4 is the ftrace call site), only +0 (Arch.ibt_entry_offset).
        """
        return self.arch.ibt_entry_offset if self.ibt else 0

    def message(self, error: str) -> str:
        if error == "MAXACT_NO_KPROBE" and self.version >= (6, 6):
            return "Maxactive is only for function exit"
        return ERRORS.get(error) or LATER_ERRORS[error]


# A sid kernel not built yet is taken as the newest known one.
NEWEST_KNOWN = (7, 2)


def grammar_for(
    kernel: str | None, arch: Arch = X86_64, config: dict[str, str] | None = None, krel: str | None = None
) -> Grammar:
    """The grammar of KERNEL (a --kernel value) on ARCH.

    With CONFIG (the kernel's .config) and KREL (its release) the kernel's own facts are
    used; without, the suite table's (kbridge.images.grammar.grammar reads a built image's).
    """
    suite = kernels.get(kernel)
    if config is not None and krel is not None:
        return Grammar(
            kernels.version_tuple(krel),
            arch,
            ibt=config.get("CONFIG_X86_KERNEL_IBT") == "y",
            btf_args=config.get("CONFIG_PROBE_EVENTS_BTF_ARGS") == "y",
        )
    version = suite.major_minor or NEWEST_KNOWN
    # Debian turns both on from trixie (6.12); bullseye and bookworm have neither. BTF arguments
    # depend on HAVE_FUNCTION_ARG_ACCESS_API too (kernel/trace/Kconfig): never on 32-bit arm.
    newer = version >= (6, 12)
    return Grammar(version, arch, ibt=newer and arch.ibt_entry_offset > 0, btf_args=newer and arch.arg_access_api)
