"""Per-architecture facts: everything that differs between the guest arches lives here.

Code elsewhere reads these fields and never branches on an arch's name: adding an arch
is adding a row to this table (and its image packages), nothing else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kbridge.errors import KbridgeError


@dataclass(frozen=True)
class Arch:
    """One guest architecture, as kbuild, Debian, QEMU and the kernel name it."""

    name: str  # kbridge's name
    uname: str  # `uname -m` in the guest
    kernel_arch: str  # ARCH= for kbuild
    debian: str  # Debian architecture
    gnu_triplet: str  # cross toolchain prefix without the trailing dash
    elf_machine: int  # e_machine of its ELF files (EM_X86_64 62, EM_AARCH64 183, EM_ARM 40)
    elf_class: int  # 64 or 32
    # -- QEMU
    qemu_binary: str
    qemu_package: str  # the Debian package with qemu_binary
    qemu_machine: tuple[str, ...]
    tcg_cpu: str  # -cpu under TCG; KVM uses -cpu host
    console: str
    direct_vmlinux: bool  # the kernel can be booted as an ELF vmlinux (x86 PVH entry)
    libvirt_machine: tuple[tuple[str, str], ...]  # vagrant-libvirt settings its machine type needs
    # -- calling conventions and pt_regs
    syscall_prefix: str  # the syscall entry wrapper (CONFIG_ARCH_HAS_SYSCALL_WRAPPER), "" when there is none
    syscall_wrapper_since: str  # the Linux version that introduced the wrappers on this arch
    arg_registers: tuple[str, ...]  # tracefs register names of the C calling convention
    # The syscall ABI's argument registers as `struct pt_regs` fields (eBPF: regs->FIELD) and
    # their offsetof() (tracefs: +OFFSET($arg1) through the user pt_regs a wrapper receives).
    syscall_arg_fields: tuple[str, ...]
    syscall_arg_offsets: tuple[int, ...]
    c_arg_fields: tuple[str, ...]  # pt_regs fields of the C calling convention's arguments (eBPF)
    dwarf_arg_registers: tuple[int, ...]  # DWARF numbers of those registers (a clone's parameters, kbridge.clones)
    tracefs_registers: frozenset[str]  # names regs_query_register_offset() accepts (%REG)
    # kbridge's eBPF probe (kbridge/guest/bpf/probe.bpf.c): clang's -D__TARGET_ARCH_ name, and the
    # pt_regs fields its KB_REG table reads, in table order (the loader's --regs are indexes here).
    bpf_target: str
    bpf_registers: tuple[str, ...]
    ip_register: str  # the instruction pointer, as tracefs and kbridge's JSON name it
    flags_register: str  # the flags / processor state register, likewise
    regs_ip: str  # the C expression of the instruction pointer in a struct pt_regs *regs
    regs_flags: str  # the C expression of the flags register
    # -- how a kprobe is planted (6.1; see kbridge.inspect)
    breakpoint_insn: bytes  # what a kprobe writes at the probe address, in memory order
    breakpoint_name: str  # as a reader knows it
    pre_ip_offset: int  # the pre-handler's ip minus the probe address (x86: after the 1-byte int3)
    insn_lengths: tuple[int, int]  # shortest and longest instruction: the post-handler's ip range
    insn_align: int  # probe offsets must be multiples of this
    decodes_insns: bool  # can_probe() decodes from the function start: an offset inside one is -EILSEQ
    kprobes_on_ftrace: bool  # CONFIG_KPROBES_ON_FTRACE: a probe on the ftrace site is an ftrace callback
    optprobes: bool  # CONFIG_OPTPROBES: a breakpoint may become a jump to a detour buffer
    ftrace_site: int  # the offset of the ftrace call site in a function (after IBT's endbr64)
    ftrace_site_len: int  # its length (MCOUNT_INSN_SIZE on x86)
    ibt_entry_offset: int  # with CONFIG_X86_KERNEL_IBT an entry probe moves past endbr64 by this
    # -- faults (kprobe fault_handler, Linux <= 5.13): what its trapnr argument carries
    trap_kind: str  # "trapnr" (the x86 trap vector) or "esr" (the arm64 exception syndrome)
    # -- host-side tools
    capstone: tuple[str, str]  # capstone's CS_ARCH_* and CS_MODE_* names for its instructions
    gdb_architecture: str  # `set architecture` for gdb-multiarch when it has no vmlinux to read it from
    host_aliases: tuple[str, ...] = field(default=())  # `uname -m` names of a host of this arch

    def cross_compile(self) -> str:
        """CROSS_COMPILE= for kbuild: empty when the host already is this arch."""
        return "" if host_arch() == self.name else f"{self.gnu_triplet}-"

    def gcc(self, version: int | str = 12) -> str:
        """The gcc binary that builds for this arch on this host."""
        return f"{self.cross_compile()}gcc-{version}"

    def gcc_package(self, version: int | str = 12) -> str:
        """The Debian package with that gcc (Debian writes the triplet with '-': x86-64-linux-gnu)."""
        if not self.cross_compile():
            return f"gcc-{version}"
        return f"gcc-{version}-{self.gnu_triplet.replace('_', '-')}"

    def binutils_package(self) -> str:
        """The Debian package with this arch's binutils (objcopy for module builds)."""
        return "binutils" if not self.cross_compile() else f"binutils-{self.gnu_triplet.replace('_', '-')}"

    @property
    def max_args(self) -> int:
        """Register arguments of the C calling convention."""
        return len(self.arg_registers)

    def is_syscall_wrapper(self, symbol: str) -> bool:
        """Whether SYMBOL is a syscall entry wrapper, whose only argument is the user's pt_regs
        (CONFIG_ARCH_HAS_SYSCALL_WRAPPER: x86_64 since 4.17, arm64 since 4.19)."""
        return bool(self.syscall_prefix) and symbol.startswith(self.syscall_prefix)

    def syscall_entry(self, name: str) -> str:
        """The function a syscall NAME ("write") enters the kernel through on this arch."""
        return f"{self.syscall_prefix}{name}" if self.syscall_prefix else f"sys_{name}"

    def max_args_of(self, symbol: str) -> int:
        """How many register arguments --arg may read on SYMBOL (a syscall wrapper: the syscall's own)."""
        return len(self.syscall_arg_fields) if self.is_syscall_wrapper(symbol) else self.max_args

    def is_data_fault(self, trap: int) -> bool:
        """Whether a fault handler's trap value is a data access fault (a read of an unmapped address)."""
        if self.trap_kind == "trapnr":
            return trap == 14  # X86_TRAP_PF
        return (trap >> 26) & 0x3F in (0x24, 0x25)  # ESR_ELx_EC_DABT_LOW / _CUR

    def describe_trap(self, trap: int) -> str:
        """A fault handler's trap value, decoded: an x86 vector, or an arm64 ESR's class and status."""
        if self.trap_kind == "trapnr":
            return f"trap {trap} ({_X86_TRAPS.get(trap, 'an x86 exception vector')})"
        return describe_esr(trap)


# arch/x86/include/asm/trapnr.h
_X86_TRAPS = {
    0: "#DE divide error",
    1: "#DB debug",
    3: "#BP breakpoint",
    6: "#UD invalid opcode",
    13: "#GP general protection fault",
    14: "#PF page fault",
}
# arch/arm64/include/asm/esr.h: exception classes, and the data/instruction fault status codes.
_ESR_CLASSES = {
    0x15: "SVC64 system call",
    0x20: "instruction abort from a lower EL",
    0x21: "instruction abort in the kernel",
    0x24: "data abort from a lower EL",
    0x25: "data abort in the kernel",
    0x3C: "BRK instruction",
}


def _fault_status(fsc: int) -> str:
    kind = {0x00: "address size fault", 0x04: "translation fault", 0x08: "access flag fault", 0x0C: "permission fault"}
    if fsc & 0x3C in kind:
        return f"level {fsc & 3} {kind[fsc & 0x3C]}"
    return {0x10: "synchronous external abort", 0x21: "alignment fault"}.get(fsc, f"fault status {fsc:#04x}")


def describe_esr(esr: int) -> str:
    """An arm64 ESR_ELx value as the kernel's esr.h decodes it: class, and for aborts the fault status."""
    ec = (esr >> 26) & 0x3F
    text = f"ESR {esr:#010x}: EC {ec:#04x} {_ESR_CLASSES.get(ec, 'exception class')}"
    if ec in (0x20, 0x21, 0x24, 0x25):
        fsc = esr & 0x3F
        text += f", {_fault_status(fsc)} (FSC {fsc:#04x})"
        if ec in (0x24, 0x25):
            text += ", on a write" if esr & (1 << 6) else ", on a read"
    return text


X86_64 = Arch(
    name="x86_64",
    uname="x86_64",
    kernel_arch="x86",
    debian="amd64",
    gnu_triplet="x86_64-linux-gnu",
    elf_machine=62,
    elf_class=64,
    qemu_binary="qemu-system-x86_64",
    qemu_package="qemu-system-x86",
    qemu_machine=("-M", "q35"),
    tcg_cpu="max",
    console="ttyS0",
    direct_vmlinux=True,
    libvirt_machine=(),
    syscall_prefix="__x64_sys_",
    syscall_wrapper_since="4.17",
    arg_registers=("di", "si", "dx", "cx", "r8", "r9"),
    # arch/x86/include/asm/ptrace.h: r15 at 0 ... r10 at 56, r9 64, r8 72, dx 96, si 104, di 112.
    # The syscall ABI passes the 4th argument in r10, not rcx.
    syscall_arg_fields=("di", "si", "dx", "r10", "r8", "r9"),
    syscall_arg_offsets=(112, 104, 96, 56, 72, 64),
    c_arg_fields=("di", "si", "dx", "cx", "r8", "r9"),
    dwarf_arg_registers=(5, 4, 1, 2, 8, 9),  # the x86-64 psABI's DWARF numbering: rdi rsi rdx rcx r8 r9
    bpf_target="x86",
    bpf_registers=("di", "si", "dx", "cx", "r8", "r9", "r10"),
    tracefs_registers=frozenset("r15 r14 r13 r12 r11 r10 r9 r8 bx cx dx si di bp ax orig_ax ip cs flags sp ss".split()),
    ip_register="ip",
    flags_register="flags",
    regs_ip="regs->ip",
    regs_flags="regs->flags",
    breakpoint_insn=bytes([0xCC]),
    breakpoint_name="int3 (0xcc)",
    pre_ip_offset=1,  # the trap leaves ip after the 1-byte int3
    insn_lengths=(1, 15),
    insn_align=1,
    decodes_insns=True,
    kprobes_on_ftrace=True,
    optprobes=True,
    ftrace_site=0,
    ftrace_site_len=5,  # the nop that becomes `call __fentry__` (MCOUNT_INSN_SIZE)
    ibt_entry_offset=4,
    trap_kind="trapnr",
    capstone=("CS_ARCH_X86", "CS_MODE_64"),
    gdb_architecture="i386:x86-64",
    host_aliases=("amd64", "x86-64", "x64"),
)

ARM64 = Arch(
    name="arm64",
    uname="aarch64",
    kernel_arch="arm64",
    debian="arm64",
    gnu_triplet="aarch64-linux-gnu",
    elf_machine=183,
    elf_class=64,
    qemu_binary="qemu-system-aarch64",
    qemu_package="qemu-system-arm",
    qemu_machine=("-M", "virt"),
    # cortex-a57, not max: pointer authentication makes -cpu max ~5x slower under TCG.
    tcg_cpu="cortex-a57",
    console="ttyAMA0",
    direct_vmlinux=False,  # Debian's arm64 vmlinuz is already an uncompressed Image
    # The `virt` machine has no PS/2 or USB input and no x86 features (apic, pae).
    libvirt_machine=(("machine_arch", "aarch64"), ("machine_type", "virt")),
    syscall_prefix="__arm64_sys_",
    syscall_wrapper_since="4.19",
    arg_registers=tuple(f"x{i}" for i in range(8)),
    # arch/arm64/include/asm/ptrace.h: regs[31] first, 8 bytes each.
    syscall_arg_fields=tuple(f"regs[{i}]" for i in range(6)),
    syscall_arg_offsets=(0, 8, 16, 24, 32, 40),
    c_arg_fields=tuple(f"regs[{i}]" for i in range(8)),
    dwarf_arg_registers=tuple(range(8)),  # x0..x7 are DWARF registers 0..7 (AAPCS64)
    bpf_target="arm64",
    bpf_registers=tuple(f"regs[{i}]" for i in range(8)),
    tracefs_registers=frozenset([f"x{i}" for i in range(31)] + ["lr", "sp", "pc", "pstate"]),
    ip_register="pc",
    flags_register="pstate",
    regs_ip="regs->pc",
    regs_flags="regs->pstate",
    breakpoint_insn=(0xD4200080).to_bytes(4, "little"),  # BRK #0x004 (KPROBES_BRK_IMM)
    breakpoint_name="BRK #4 (0xd4200080)",
    pre_ip_offset=0,  # the BRK is reported at its own address
    insn_lengths=(4, 4),
    insn_align=4,
    decodes_insns=False,
    kprobes_on_ftrace=False,  # 6.1: check_ftrace_location() refuses the ftrace site
    optprobes=False,
    # -fpatchable-function-entry=2: the second nop becomes `bl ftrace_caller`.
    ftrace_site=4,
    ftrace_site_len=4,
    ibt_entry_offset=0,
    trap_kind="esr",
    capstone=("CS_ARCH_ARM64", "CS_MODE_ARM"),
    gdb_architecture="aarch64",
    host_aliases=("aarch64",),
)

ARCHES: dict[str, Arch] = {a.name: a for a in (X86_64, ARM64)}
_ALIASES = {alias: a.name for a in ARCHES.values() for alias in (*a.host_aliases, a.uname, a.debian)}


def host_arch() -> str:
    """kbridge's name for the machine kbridge runs on."""
    m = os.uname().machine  # platform.machine(), without importing platform
    return _ALIASES.get(m, m)


def get_arch(name: Arch | str | None) -> Arch:
    """Look an arch up by kbridge, Debian or uname name; None means the host's, an Arch itself."""
    if isinstance(name, Arch):
        return name
    key = _ALIASES.get(name, name) if name else host_arch()
    try:
        return ARCHES[key]
    except KeyError:
        raise KbridgeError(f"unsupported arch {name!r}", f"use one of: {', '.join(ARCHES)}") from None


def by_elf_machine(machine: int) -> Arch | None:
    """The arch whose ELF files carry e_machine MACHINE, if kbridge knows it."""
    return next((a for a in ARCHES.values() if a.elf_machine == machine), None)
