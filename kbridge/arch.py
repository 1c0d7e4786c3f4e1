"""Per-architecture facts: everything that differs between x86_64 and arm64 lives here."""

from __future__ import annotations

import platform
from dataclasses import dataclass

from kbridge.errors import KbridgeError


@dataclass(frozen=True)
class Arch:
    """One guest architecture, as kbuild, Debian, QEMU and the kernel name it."""

    name: str  # kbridge's name, also `uname -m` in the guest (arm64 says aarch64)
    uname: str
    kernel_arch: str  # ARCH= for kbuild
    debian: str  # Debian architecture
    gnu_triplet: str  # cross toolchain prefix without the trailing dash
    qemu_binary: str
    qemu_machine: tuple[str, ...]
    tcg_cpu: str  # -cpu under TCG; KVM uses -cpu host
    console: str
    syscall_prefix: str  # the syscall entry wrapper (CONFIG_ARCH_HAS_SYSCALL_WRAPPER)
    arg_registers: tuple[str, ...]  # tracefs register names of the C calling convention
    max_args: int
    breakpoint_insn: bytes  # what a kprobe writes at the probe address, in memory order
    direct_vmlinux: bool  # the kernel can be booted as an ELF vmlinux (x86 PVH entry)
    # The syscall ABI's argument registers as `struct pt_regs` fields (bcc: regs->FIELD) and
    # their offsetof() (tracefs: +OFFSET($arg1) through the user pt_regs a wrapper receives).
    syscall_arg_fields: tuple[str, ...]
    syscall_arg_offsets: tuple[int, ...]
    c_arg_fields: tuple[str, ...]  # pt_regs fields of the C calling convention's arguments (bcc)
    tracefs_registers: frozenset[str]  # names regs_query_register_offset() accepts (%REG)
    ip_register: str  # the instruction pointer as tracefs names it
    flags_register: str  # the flags / processor state register as tracefs names it
    qemu_package: str  # the Debian package with qemu_binary
    objdump_machine: str  # objdump -m for raw bytes

    def cross_compile(self) -> str:
        """CROSS_COMPILE= for kbuild: empty when the host already is this arch."""
        return "" if host_arch() == self.name else f"{self.gnu_triplet}-"

    def gcc_package(self, version: int = 12) -> str:
        """The Debian package with the gcc that builds modules for this arch on this host."""
        return f"gcc-{version}" if not self.cross_compile() else f"gcc-{version}-{self.gnu_triplet}"

    def objdump(self) -> str:
        """The objdump binary that disassembles this arch on this host (binutils-TRIPLET)."""
        return "objdump" if not self.cross_compile() else f"{self.gnu_triplet}-objdump"

    def is_syscall_wrapper(self, symbol: str) -> bool:
        """Whether SYMBOL is a syscall entry wrapper, whose only argument is the user's pt_regs
        (CONFIG_ARCH_HAS_SYSCALL_WRAPPER: x86_64 since 4.17, arm64 since 4.19)."""
        return symbol.startswith(self.syscall_prefix)


X86_64 = Arch(
    name="x86_64",
    uname="x86_64",
    kernel_arch="x86",
    debian="amd64",
    gnu_triplet="x86_64-linux-gnu",
    qemu_binary="qemu-system-x86_64",
    qemu_machine=("-M", "q35"),
    tcg_cpu="max",
    console="ttyS0",
    syscall_prefix="__x64_sys_",
    arg_registers=("di", "si", "dx", "cx", "r8", "r9"),
    max_args=6,
    breakpoint_insn=bytes([0xCC]),  # int3
    direct_vmlinux=True,
    # arch/x86/include/asm/ptrace.h: r15 at 0 ... r10 at 56, r9 64, r8 72, dx 96, si 104, di 112.
    # The syscall ABI passes the 4th argument in r10, not rcx.
    syscall_arg_fields=("di", "si", "dx", "r10", "r8", "r9"),
    syscall_arg_offsets=(112, 104, 96, 56, 72, 64),
    c_arg_fields=("di", "si", "dx", "cx", "r8", "r9"),
    tracefs_registers=frozenset(
        [
            "r15",
            "r14",
            "r13",
            "r12",
            "r11",
            "r10",
            "r9",
            "r8",
            "bx",
            "cx",
            "dx",
            "si",
            "di",
            "bp",
            "ax",
            "orig_ax",
            "ip",
            "cs",
            "flags",
            "sp",
            "ss",
        ]
    ),
    ip_register="ip",
    flags_register="flags",
    qemu_package="qemu-system-x86",
    objdump_machine="i386:x86-64",
)

ARM64 = Arch(
    name="arm64",
    uname="aarch64",
    kernel_arch="arm64",
    debian="arm64",
    gnu_triplet="aarch64-linux-gnu",
    qemu_binary="qemu-system-aarch64",
    qemu_machine=("-M", "virt"),
    # cortex-a57, not max: pointer authentication makes -cpu max ~5x slower under TCG.
    tcg_cpu="cortex-a57",
    console="ttyAMA0",
    syscall_prefix="__arm64_sys_",
    arg_registers=tuple(f"x{i}" for i in range(8)),
    max_args=8,
    breakpoint_insn=(0xD4200080).to_bytes(4, "little"),  # BRK #0x004 (KPROBES_BRK_IMM)
    direct_vmlinux=False,  # Debian's arm64 vmlinuz is already an uncompressed Image
    # arch/arm64/include/asm/ptrace.h: regs[31] first, 8 bytes each.
    syscall_arg_fields=tuple(f"regs[{i}]" for i in range(6)),
    syscall_arg_offsets=(0, 8, 16, 24, 32, 40),
    c_arg_fields=tuple(f"regs[{i}]" for i in range(8)),
    tracefs_registers=frozenset([f"x{i}" for i in range(31)] + ["lr", "sp", "pc", "pstate"]),
    ip_register="pc",
    flags_register="pstate",
    qemu_package="qemu-system-arm",
    objdump_machine="aarch64",
)

ARCHES: dict[str, Arch] = {a.name: a for a in (X86_64, ARM64)}
_ALIASES = {"amd64": "x86_64", "x86-64": "x86_64", "x64": "x86_64", "aarch64": "arm64"}


def host_arch() -> str:
    """kbridge's name for the machine kbridge runs on."""
    m = platform.machine()
    return _ALIASES.get(m, m)


def get_arch(name: str | None) -> Arch:
    """Look an arch up by kbridge, Debian or uname name; None means the host's."""
    key = _ALIASES.get(name, name) if name else host_arch()
    try:
        return ARCHES[key]
    except KeyError:
        raise KbridgeError(f"unsupported arch {name!r}", f"use one of: {', '.join(ARCHES)}") from None
