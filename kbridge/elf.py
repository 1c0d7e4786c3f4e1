"""What kbridge reads from ELF files, through pyelftools (ELF32 and ELF64, DWARF line tables).

A kernel module's .modinfo (vermagic, parameters), an executable's libraries and
loader (the guest initramfs), its machine (is a file for this guest's arch?), and
the source line of FUNCTION+OFFSET in a module built with debug info (an oops), and
which of a function's parameters a compiler clone of it receives, in which register.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import PurePosixPath

from elftools.common.exceptions import ELFError
from elftools.dwarf.compileunit import CompileUnit
from elftools.dwarf.constants import DW_LNE
from elftools.dwarf.die import DIE
from elftools.dwarf.dwarf_expr import DWARFExprParser
from elftools.dwarf.dwarfinfo import DWARFInfo
from elftools.dwarf.lineprogram import LineProgram
from elftools.dwarf.locationlists import LocationEntry, LocationExpr, LocationParser
from elftools.elf.constants import SH_FLAGS
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationHandler
from elftools.elf.sections import SymbolTableSection

from kbridge.errors import KbridgeError


def _open(data: bytes, what: str) -> ELFFile:
    try:
        return ELFFile(io.BytesIO(data))
    except ELFError as e:
        raise KbridgeError(f"{what} is not an ELF file ({e})") from None


def is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF"


def machine(data: bytes, what: str = "file") -> int:
    """e_machine (EM_X86_64 62, EM_AARCH64 183, EM_ARM 40)."""
    return _machine_number(_open(data, what))


def _machine_number(f: ELFFile) -> int:
    # pyelftools names the machine ("EM_X86_64"); the raw number is in the header's bytes.
    f.stream.seek(18)
    raw = f.stream.read(2)
    return int.from_bytes(raw, "little" if f.little_endian else "big")


def modinfo_items(data: bytes, what: str = "module") -> list[tuple[str, str]]:
    """The key=value strings of a kernel module's .modinfo section, in order."""
    sec = _open(data, what).get_section_by_name(".modinfo")
    if sec is None:
        raise KbridgeError(f"{what} has no .modinfo section: not a kernel module")
    items = []
    for item in sec.data().split(b"\0"):
        if b"=" in item:
            k, v = item.decode(errors="replace").split("=", 1)
            items.append((k, v))
    return items


def modinfo(data: bytes, what: str = "module") -> dict[str, str]:
    """.modinfo as a dict (the first value of each key)."""
    info: dict[str, str] = {}
    for k, v in modinfo_items(data, what):
        info.setdefault(k, v)
    return info


def module_params(data: bytes, what: str = "module") -> dict[str, str]:
    """module_param name -> type, from .modinfo's parmtype=NAME:TYPE entries."""
    params = {}
    for k, v in modinfo_items(data, what):
        if k == "parmtype":
            name, _, ptype = v.partition(":")
            params[name] = ptype
    return params


def undefined_symbols(data: bytes, what: str = "module") -> set[str]:
    """The symbols an object uses but does not define (a module's imports, resolved at insmod)."""
    symtab = _open(data, what).get_section_by_name(".symtab")
    if not isinstance(symtab, SymbolTableSection):
        return set()
    return {s.name for s in symtab.iter_symbols() if s.name and s["st_shndx"] == "SHN_UNDEF"}


def needed(data: bytes, what: str = "file") -> list[str]:
    """The DT_NEEDED libraries of a dynamically linked executable or library."""
    libs = []
    for sec in _open(data, what).iter_sections():
        if isinstance(sec, DynamicSection):
            libs += [tag.needed for tag in sec.iter_tags() if tag.entry.d_tag == "DT_NEEDED"]  # type: ignore[attr-defined]  # DT_NEEDED tags carry it
    return libs


def interpreter(data: bytes, what: str = "file") -> str | None:
    """The PT_INTERP path (the dynamic loader), if any."""
    for seg in _open(data, what).iter_segments():
        if seg.header.p_type == "PT_INTERP":
            return str(seg.get_interp_name())  # type: ignore[attr-defined]  # an InterpSegment
    return None


def source_line(data: bytes, function: str, offset: int) -> tuple[str, int] | None:
    """(file, line) of FUNCTION+OFFSET in an object built with debug info (a .ko), from DWARF.

    FUNCTION may be a part the compiler moved out of line (f.cold, in .text.unlikely). A
    module is relocatable: each of its code sections (.text, .text.unlikely, .init.text)
    starts at 0, so an address alone names a place in each of them. The line table's
    sequences are told apart by the section each one's DW_LNE_set_address is relocated
    against; the row is looked up in the sequences of FUNCTION's own section.
    """
    f = _open(data, "module")
    if not f.has_dwarf_info():
        return None
    symtab = f.get_section_by_name(".symtab")
    if not isinstance(symtab, SymbolTableSection):
        return None
    syms = [s for s in symtab.get_symbol_by_name(function) or () if s["st_info"]["type"] == "STT_FUNC"]
    if len(syms) != 1 or not isinstance(syms[0]["st_shndx"], int):
        return None
    section, addr = syms[0]["st_shndx"], syms[0]["st_value"] + offset
    dwarf = f.get_dwarf_info()
    for cu in dwarf.iter_CUs():
        program = dwarf.line_program_for_CU(cu)
        if program is None:
            continue
        if (row := _row_at(program, _sequence_sections(f, program), section, addr)) is not None:
            file_index, line = row
            names = program.header["file_entry"]
            entry_i = file_index if program.header["version"] >= 5 else file_index - 1
            fname = names[entry_i].name.decode(errors="replace") if 0 <= entry_i < len(names) else "?"
            return PurePosixPath(fname).name, line
    return None


def _sequence_sections(f: ELFFile, program: LineProgram) -> list[int]:
    """The code section of each DW_LNE_set_address of PROGRAM, in order: the sections of the
    relocations .debug_line has in PROGRAM's range that point into code (the others are
    the header's string offsets)."""
    debug_line = f.get_section_by_name(".debug_line")
    rel = RelocationHandler(f).find_relocations_for_section(debug_line) if debug_line is not None else None
    if rel is None:
        return []
    symtab = f.get_section(rel["sh_link"])
    if not isinstance(symtab, SymbolTableSection):
        return []
    out = []
    for r in sorted(rel.iter_relocations(), key=lambda r: r["r_offset"]):
        if not program.program_start_offset <= r["r_offset"] < program.program_end_offset:
            continue
        shndx = symtab.get_symbol(r["r_info_sym"])["st_shndx"]
        if isinstance(shndx, int) and f.get_section(shndx)["sh_flags"] & SH_FLAGS.SHF_EXECINSTR:
            out.append(shndx)
    return out


def _row_at(program: LineProgram, sections: list[int], section: int, addr: int) -> tuple[int, int] | None:
    """(file index, line) of the row covering ADDR in a sequence of SECTION."""
    current: int | None = None  # the section of the sequence being read (None: not known)
    placed = 0
    rows: list[tuple[int, int, int]] = []
    for entry in program.get_entries():
        if entry.is_extended and entry.command == DW_LNE.set_address:
            current = sections[placed] if placed < len(sections) else None
            placed += 1
        st = entry.state
        if st is None:
            continue
        if st.end_sequence:
            if current == section and rows and rows[0][0] <= addr < st.address:
                _, file_index, line = max((r for r in rows if r[0] <= addr), key=lambda r: r[0])
                return file_index, line
            rows, current = [], None
            continue
        rows.append((st.address, st.file, int(st.line)))
    return None


@dataclass(frozen=True)
class CloneParam:
    """One source parameter of a compiler clone (.constprop/.isra), as DWARF describes the clone."""

    name: str
    position: int  # 1-based, in the source prototype
    register: int | None  # the DWARF register holding it at the clone's entry (None: not passed)
    const: int | None  # the constant the compiler propagated into the clone instead


def clone_parameters(data: bytes, clone: str) -> list[CloneParam] | None:
    """What CLONE (a symbol such as f.constprop.0) receives of its source function's parameters.

    GCC describes a clone as a subprogram whose DW_AT_abstract_origin is the source
    function: each parameter it still receives has a location (a register at its entry),
    each one folded away a DW_AT_const_value or nothing. None when the object has no
    DWARF for CLONE.
    """
    f = _open(data, "module")
    symtab = f.get_section_by_name(".symtab")
    if not f.has_dwarf_info() or not isinstance(symtab, SymbolTableSection):
        return None
    syms = [s for s in symtab.get_symbol_by_name(clone) or () if s["st_info"]["type"] == "STT_FUNC"]
    if len(syms) != 1:
        return None
    start, size, base = syms[0]["st_value"], syms[0]["st_size"] or 1, clone.split(".", 1)[0]
    dwarf = f.get_dwarf_info()
    locations = LocationParser(dwarf.location_lists())
    for cu in dwarf.iter_CUs():
        for die in cu.iter_DIEs():
            attrs = die.attributes
            if die.tag != "DW_TAG_subprogram" or "DW_AT_abstract_origin" not in attrs or "DW_AT_low_pc" not in attrs:
                continue
            origin = die.get_DIE_from_attribute("DW_AT_abstract_origin")
            # arm64's DWARF starts the function past its patchable-entry NOPs (ftrace): inside the symbol.
            if not start <= attrs["DW_AT_low_pc"].value < start + size or _name(origin) != base:
                continue
            source = [_name(p) for p in origin.iter_children() if p.tag == "DW_TAG_formal_parameter"]
            out = []
            for p in die.iter_children():
                if p.tag != "DW_TAG_formal_parameter" or "DW_AT_abstract_origin" not in p.attributes:
                    continue
                name = _name(p.get_DIE_from_attribute("DW_AT_abstract_origin"))
                if name not in source:
                    continue
                const = p.attributes.get("DW_AT_const_value")
                reg = _entry_register(p, cu, locations, dwarf) if const is None else None
                out.append(CloneParam(name, source.index(name) + 1, reg, const.value if const else None))
            return sorted(out, key=lambda c: c.position)
    return None


def _name(die: DIE) -> str:
    attr = die.attributes.get("DW_AT_name")
    return attr.value.decode(errors="replace") if attr is not None else ""


def _entry_register(param: DIE, cu: CompileUnit, locations: LocationParser, dwarf: DWARFInfo) -> int | None:
    """The register PARAM is in at its function's entry: DW_OP_regN, directly or first in its location list."""
    attr = param.attributes.get("DW_AT_location")
    if attr is None:
        return None
    loc = locations.parse_from_attribute(attr, cu["version"], die=param)
    if isinstance(loc, LocationExpr):
        expr = loc.loc_expr
    else:
        entries = [e for e in loc if isinstance(e, LocationEntry)]
        if not entries:
            return None
        expr = min(entries, key=lambda e: e.begin_offset).loc_expr
    ops = DWARFExprParser(dwarf.structs).parse_expr(expr)
    if len(ops) == 1 and ops[0].op_name.startswith("DW_OP_reg") and ops[0].op_name != "DW_OP_regx":
        return int(ops[0].op_name[len("DW_OP_reg") :])
    if len(ops) == 1 and ops[0].op_name == "DW_OP_regx":
        return int(ops[0].args[0])
    return None
