"""Per-architecture facts: everything that differs between the guest arches (x86_64, arm64, arm) lives here.

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
    # -- Debian
    kernel_package: str  # the metapackage that depends on the arch's current kernel (its flavour)
    # -- calling conventions and pt_regs
    syscall_prefix: str  # the syscall entry wrapper (CONFIG_ARCH_HAS_SYSCALL_WRAPPER), "" when there is none
    syscall_wrapper_since: str  # the Linux version that introduced the wrappers on this arch ("" if none)
    arg_registers: tuple[str, ...]  # tracefs register names of the C calling convention
    # CONFIG_HAVE_FUNCTION_ARG_ACCESS_API: regs_get_kernel_argument() in C and $argN in
    # kprobe_events. Without it, arguments come from arg_registers, then from the stack.
    arg_access_api: bool
    stack_args: int  # arguments read from the stack at the function's entry, after arg_registers
    # The syscall ABI's argument registers as `struct pt_regs` fields (eBPF: regs->FIELD) and
    # their offsetof() (tracefs: +OFFSET($arg1) through the user pt_regs a wrapper receives).
    syscall_arg_fields: tuple[str, ...]
    syscall_arg_offsets: tuple[int, ...]
    c_arg_fields: tuple[str, ...]  # pt_regs fields of the C calling convention's arguments (eBPF)
    dwarf_arg_registers: tuple[int, ...]  # DWARF numbers of those registers (a clone's parameters, kbridge.clones)
    tracefs_registers: frozenset[str]  # names regs_query_register_offset() accepts (%REG)
    # kbridge's eBPF probe (kbridge/guest/bpf/probe.bpf.c): clang's -D__TARGET_ARCH_ name ("": the
    # probe is not built for this arch), and the pt_regs fields its KB_REG table reads, in table
    # order (the loader's --regs are indexes here).
    bpf_target: str
    bpf_registers: tuple[str, ...]
    ip_register: str  # the instruction pointer, as tracefs and kbridge's JSON name it
    flags_register: str  # the flags / processor state register, likewise
    regs_ip: str  # the C expression of the instruction pointer in a struct pt_regs *regs
    regs_flags: str  # the C expression of the flags register
    # -- how a kprobe is planted (6.1; see kbridge.inspect)
    breakpoint_insn: bytes  # what a kprobe writes at the probe address, in memory order
    breakpoint_name: str  # as a reader knows it
    breakpoint_keeps_cond: bool  # the kernel ORs the probed instruction's condition field (bits 28-31) in
    # How the probed instruction runs after a breakpoint trap, before the post-handler.
    insn_after_trap: str
    single_steps: bool  # out of line from a slot (x86_64, arm64), not simulated in the trap handler (arm)
    pre_ip_offset: int  # the pre-handler's ip minus the probe address (x86: after the 1-byte int3)
    insn_lengths: tuple[int, int]  # shortest and longest instruction: the post-handler's ip range
    insn_align: int  # probe offsets must be multiples of this
    decodes_insns: bool  # can_probe() decodes from the function start: an offset inside one is -EILSEQ
    # Which instructions arch_prepare_kprobe()'s decoder refuses with -EINVAL ("" where none is named).
    insn_rejects: str
    kprobes_on_ftrace: bool  # CONFIG_KPROBES_ON_FTRACE: a probe on the ftrace site is an ftrace callback
    optprobes: bool  # CONFIG_OPTPROBES: a breakpoint may become a jump to a detour buffer
    ftrace_site: int | None  # the offset of the ftrace call site in a function (None: it varies per function)
    ftrace_site_len: int  # its length (MCOUNT_INSN_SIZE on x86)
    ftrace_site_text: str  # what the ftrace call site is, for a reader
    ibt_entry_offset: int  # with CONFIG_X86_KERNEL_IBT an entry probe moves past endbr64 by this
    # -- faults (kprobe fault_handler, Linux <= 5.13): what its trapnr argument carries
    # "trapnr" (the x86 trap vector), "esr" (the arm64 exception syndrome) or "fsr" (arm's fault status)
    trap_kind: str
    # -- host-side tools
    capstone: tuple[str, str]  # capstone's CS_ARCH_* and CS_MODE_* names for its instructions
    gdb_architecture: str  # `set architecture` for gdb-multiarch when it has no vmlinux to read it from
    host_aliases: tuple[str, ...] = field(default=())  # `uname -m` names of a host of this arch
    # What `kbridge inspect` reads of the live kprobe's decoded instruction (kp.ainsn, struct
    # arch_specific_insn): (name, printk format, C expression), printed by kmod/inspect.c.j2.
    insn_facts: tuple[tuple[str, str, str], ...] = field(default=())
    # Why bcc (Debian's python3-bpfcc) cannot compile kprobe programs for this arch ("": it can).
    bcc_refusal: str = ""
    # Why kbridge builds no Vagrant box for this arch ("": it does).
    box_refusal: str = ""

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

    def libc_dev_package(self) -> str:
        """The Debian package with this arch's libc for static programs (libc6-dev-armhf-cross...)."""
        return "libc6-dev" if not self.cross_compile() else f"libc6-dev-{self.debian}-cross"

    def binutils_package(self) -> str:
        """The Debian package with this arch's binutils (objcopy for module builds)."""
        return "binutils" if not self.cross_compile() else f"binutils-{self.gnu_triplet.replace('_', '-')}"

    @property
    def max_args(self) -> int:
        """Arguments --arg may read: the calling convention's registers, then its stack slots."""
        return len(self.arg_registers) + self.stack_args

    def c_arg(self, index: int, regs: str = "regs") -> str:
        """C for the INDEX-th (0-based) argument of a probed function at its entry, from REGS.

        With the arg access API, regs_get_kernel_argument(); without (32-bit arm, AAPCS) the
        first arguments are in registers (c_arg_fields) and the rest on the stack, at the stack
        pointer when the function starts (regs_get_kernel_stack_nth() is not exported to modules).
        """
        if self.arg_access_api:
            return f"regs_get_kernel_argument({regs}, {index})"
        if index < len(self.c_arg_fields):
            return f"{regs}->{self.c_arg_fields[index]}"
        return f"((unsigned long *)kernel_stack_pointer({regs}))[{index - len(self.c_arg_fields)}]"

    def breakpoint_for(self, original: bytes) -> bytes:
        """The breakpoint the kernel writes over ORIGINAL (the probed instruction, memory order)."""
        if not self.breakpoint_keeps_cond or len(original) < 4:
            return self.breakpoint_insn
        # arch/arm/probes/kprobes/core.c arch_arm_kprobe(): an instruction's condition field
        # (< 0xe0000000: not "always") is kept, so the undefined instruction traps only when
        # the probed instruction would have run.
        word = int.from_bytes(original[:4], "little")
        bkp = int.from_bytes(self.breakpoint_insn, "little")
        if word < 0xE0000000:
            bkp = (bkp & 0x0FFFFFFF) | (word & 0xF0000000)
        return bkp.to_bytes(4, "little")

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
        if self.trap_kind == "fsr":
            # do_page_fault() passes the FSR of a translation, access flag, domain or permission fault.
            return _fsr_status(trap) in (3, 5, 6, 7, 9, 11, 13, 15)
        return (trap >> 26) & 0x3F in (0x24, 0x25)  # ESR_ELx_EC_DABT_LOW / _CUR

    def describe_trap(self, trap: int) -> str:
        """A fault handler's trap value, decoded: an x86 vector, an arm64 ESR's class and status, an arm FSR."""
        if self.trap_kind == "trapnr":
            return f"trap {trap} ({_X86_TRAPS.get(trap, 'an x86 exception vector')})"
        if self.trap_kind == "fsr":
            return describe_fsr(trap)
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


# arch/arm/mm/fsr-2level.c fsr_info[]: the fault status (FS[4] at bit 10, FS[3:0]) of a non-LPAE FSR.
_FSR_STATUS = {
    1: "alignment exception",
    2: "debug event",
    3: "section access flag fault",
    5: "section translation fault",
    6: "page access flag fault",
    7: "page translation fault",
    8: "external abort on non-linefetch",
    9: "section domain fault",
    11: "page domain fault",
    12: "external abort on translation",
    13: "section permission fault",
    14: "external abort on translation",
    15: "page permission fault",
}


def _fsr_status(fsr: int) -> int:
    return (fsr & 0xF) | ((fsr >> 6) & 0x10)


def describe_fsr(fsr: int) -> str:
    """A 32-bit arm (short-descriptor) FSR as the kernel's fsr-2level.c names it, read or write."""
    fs = _fsr_status(fsr)
    rw = ", on a write" if fsr & (1 << 11) else ", on a read"  # FSR_WRITE
    return f"FSR {fsr:#x}: {_FSR_STATUS.get(fs, f'fault status {fs:#x}')}{rw}"


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
    kernel_package="linux-image-amd64",
    syscall_prefix="__x64_sys_",
    syscall_wrapper_since="4.17",
    arg_registers=("di", "si", "dx", "cx", "r8", "r9"),
    arg_access_api=True,
    stack_args=0,
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
    breakpoint_keeps_cond=False,
    insn_after_trap="single-stepped out of line",
    single_steps=True,
    pre_ip_offset=1,  # the trap leaves ip after the 1-byte int3
    insn_lengths=(1, 15),
    insn_align=1,
    decodes_insns=True,
    insn_rejects="",
    kprobes_on_ftrace=True,
    optprobes=True,
    ftrace_site=0,
    ftrace_site_len=5,  # the nop that becomes `call __fentry__` (MCOUNT_INSN_SIZE)
    ftrace_site_text="the 5-byte nop at the function's entry that ftrace turns into `call __fentry__`",
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
    kernel_package="linux-image-arm64",
    syscall_prefix="__arm64_sys_",
    syscall_wrapper_since="4.19",
    arg_registers=tuple(f"x{i}" for i in range(8)),
    arg_access_api=True,
    stack_args=0,
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
    breakpoint_keeps_cond=False,
    insn_after_trap="single-stepped out of line",
    single_steps=True,
    pre_ip_offset=0,  # the BRK is reported at its own address
    insn_lengths=(4, 4),
    insn_align=4,
    decodes_insns=False,
    insn_rejects="arch/arm64/kernel/probes/decode-insn.c, INSN_REJECTED: e.g. an exclusive load/store or "
    "an instruction that reads DAIF",
    kprobes_on_ftrace=False,  # 6.1: check_ftrace_location() refuses the ftrace site
    optprobes=False,
    # -fpatchable-function-entry=2: the second nop becomes `bl ftrace_caller`.
    ftrace_site=4,
    ftrace_site_len=4,
    ftrace_site_text="the patchable-function-entry nop that ftrace turns into `bl ftrace_caller`",
    ibt_entry_offset=0,
    trap_kind="esr",
    capstone=("CS_ARCH_ARM64", "CS_MODE_ARM"),
    gdb_architecture="aarch64",
    host_aliases=("aarch64",),
)

ARM = Arch(
    name="arm",
    uname="armv7l",
    kernel_arch="arm",
    debian="armhf",
    gnu_triplet="arm-linux-gnueabihf",
    elf_machine=40,
    elf_class=32,
    qemu_binary="qemu-system-arm",
    qemu_package="qemu-system-arm",
    # highmem=off: with it on, `virt` puts the PCIe ECAM above 4 GiB (0x4010000000), which a
    # non-LPAE kernel (armmp) cannot map ("can't claim ECAM area": no virtio-pci, no agent).
    # Off, the ECAM sits at 0x3f000000 and RAM is capped at ~3 GiB.
    qemu_machine=("-M", "virt,highmem=off"),
    tcg_cpu="cortex-a15",  # ARMv7-A with LPAE and idiv, what Debian's armmp kernel targets
    console="ttyAMA0",
    direct_vmlinux=False,  # Debian's armhf vmlinuz is a zImage: -kernel boots it as it is
    libvirt_machine=(),
    kernel_package="linux-image-armmp",  # ARMv7 multiplatform, non-LPAE (armmp-lpae is the other flavour)
    # No CONFIG_ARCH_HAS_SYSCALL_WRAPPER: sys_write is the syscall itself (an alias of
    # __se_sys_write) and takes fd, buf and count in r0-r2 like any C function.
    syscall_prefix="",
    syscall_wrapper_since="",
    arg_registers=("r0", "r1", "r2", "r3"),  # AAPCS: the rest are passed on the stack
    arg_access_api=False,  # arch/arm selects no HAVE_FUNCTION_ARG_ACCESS_API (6.1): $argN is BAD_VAR
    stack_args=4,  # arguments 5-8 from the stack at entry ($stack0.., sp[0]..)
    # arch/arm/include/uapi/asm/ptrace.h: struct pt_regs { long uregs[18]; }, ARM_r0 is uregs[0].
    # The EABI syscall ABI passes arguments in r0-r6 (not read through a wrapper here: there is none).
    syscall_arg_fields=tuple(f"uregs[{i}]" for i in range(6)),
    syscall_arg_offsets=(0, 4, 8, 12, 16, 20),
    c_arg_fields=tuple(f"uregs[{i}]" for i in range(4)),
    dwarf_arg_registers=(0, 1, 2, 3),  # r0..r3 are DWARF registers 0..3
    # arch/arm/kernel/ptrace.c regoffset_table[] (6.1); r11-r13 are named fp, ip, sp.
    tracefs_registers=frozenset([f"r{i}" for i in range(11)] + ["fp", "ip", "sp", "lr", "pc", "cpsr", "ORIG_r0"]),
    # kbridge's eBPF loader and probe are built for x86_64 and arm64 only (bcc cannot serve arm either).
    bpf_target="",
    bpf_registers=(),
    ip_register="pc",
    flags_register="cpsr",
    regs_ip="regs->ARM_pc",
    regs_flags="regs->ARM_cpsr",
    # KPROBE_ARM_BREAKPOINT_INSTRUCTION 0x07f001f8 (arch/arm/probes/kprobes/core.h), an undefined
    # instruction in the permanently undefined space (UDF #24), with the condition "always" (0xe)
    # or the probed instruction's own: the undefined-instruction exception is the trap.
    breakpoint_insn=(0xE7F001F8).to_bytes(4, "little"),
    breakpoint_name="UDF #24 (0xe7f001f8, an undefined instruction)",
    breakpoint_keeps_cond=True,
    # 32-bit arm never single-steps in hardware: arch_prepare_kprobe() decoded the instruction
    # (arch/arm/probes/decode-arm.c) into a handler that simulates it in C or emulates it from
    # an instruction slot, in the undefined-instruction handler itself.
    insn_after_trap="simulated or emulated in the trap handler",
    single_steps=False,
    pre_ip_offset=0,  # the undefined instruction is reported at its own address
    insn_lengths=(4, 4),  # ARM mode (Debian builds armmp without THUMB2_KERNEL); a branch goes elsewhere
    insn_align=4,
    decodes_insns=False,  # a misaligned offset is -EINVAL; the decoder's refusals are -EINVAL too
    insn_rejects="arch/arm/probes/decode-arm.c, INSN_REJECTED: e.g. an mrc/mcr coprocessor access such as "
    "reading the thread register",
    kprobes_on_ftrace=False,  # no KPROBES_ON_FTRACE: check_ftrace_location() refuses the site
    optprobes=True,  # HAVE_OPTPROBES (not Thumb-2): a `b` to a detour buffer within 32 MiB
    # gcc -pg: `push {lr}; bl __gnu_mcount_nc` after the prologue, so the offset varies per
    # function (ksys_write+0xc on 6.1); ftrace leaves `add sp, sp, #4` there while off.
    ftrace_site=None,
    ftrace_site_len=4,
    ftrace_site_text="the `bl __gnu_mcount_nc` after the prologue's `push {lr}` (an `add sp, sp, #4` while "
    "ftrace is off)",
    ibt_entry_offset=0,
    trap_kind="fsr",
    capstone=("CS_ARCH_ARM", "CS_MODE_ARM"),
    gdb_architecture="arm",
    host_aliases=("armv7", "armv8l", "arm32"),
    # arch/arm/include/asm/probes.h struct arch_probes_insn (6.1): the handler decode-arm.c chose
    # (simulate_*: in C, no slot; emulate_*: a copy run from an instruction slot) and whether an
    # optimized probe runs the instruction itself in its detour buffer.
    insn_facts=(
        ("handler", "%ps", "(void *)kp.ainsn.insn_handler"),
        ("slot", "%d", "kp.ainsn.insn != NULL"),
        ("direct_exec", "%d", "(int)kp.ainsn.kprobe_direct_exec"),
    ),
    # Measured with bookworm's python3-bpfcc 0.26 (armhf) in the guest: 17 errors from arm's
    # headers under bcc's clang frontend, and libbcc's helpers have no 32-bit arm pt_regs.
    bcc_refusal=(
        "Debian's bcc (python3-bpfcc 0.26) cannot compile kprobe programs for 32-bit arm: its clang "
        "frontend fails on arm's kernel headers (inline asm constraints, 'SMP not supported on "
        "pre-ARMv6 CPUs') and its helpers know no arm pt_regs"
    ),
    # libvirt's `virt` machine keeps highmem on (the ECAM above 4 GiB), which armmp cannot map.
    box_refusal=(
        "kbridge builds no Vagrant box for 32-bit arm: libvirt starts the `virt` machine with its PCI "
        "ECAM above 4 GiB, which Debian's non-LPAE armmp kernel cannot map (no virtio devices)"
    ),
)

ARCHES: dict[str, Arch] = {a.name: a for a in (X86_64, ARM64, ARM)}
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
