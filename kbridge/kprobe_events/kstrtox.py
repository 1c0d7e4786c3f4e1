"""lib/kstrtox.c and __is_good_name(), exactly: how the kernel reads numbers and names in a line."""

from __future__ import annotations

_U64 = (1 << 64) - 1


def _parse_integer(s: str, base: int) -> tuple[int, int, bool]:
    """lib/kstrtox.c _parse_integer_fixup_radix + _parse_integer: value, chars used (incl. 0x), overflow."""
    skip = 0
    if base == 0:
        base = 16 if s[:1] == "0" and s[1:2].lower() == "x" and _isxdigit(s[2:3]) else (8 if s[:1] == "0" else 10)
    if base == 16 and s[:1] == "0" and s[1:2].lower() == "x":
        skip = 2
    value, used, overflow = 0, 0, False
    for c in s[skip:]:
        digit = "0123456789abcdef".find(c.lower()) if c.isascii() else -1
        if digit < 0 or digit >= base:
            break
        value = value * base + digit
        overflow |= value > _U64
        used += 1
    return value & _U64, skip + used if used else 0, overflow


def _isxdigit(c: str) -> bool:
    return c != "" and c in "0123456789abcdefABCDEF"


def isdigit(c: str) -> bool:
    return c != "" and c in "0123456789"


def kstrtoull(s: str, base: int = 0) -> int | None:
    """kstrtoull(): None for -EINVAL/-ERANGE.  A leading '+' is allowed."""
    if s[:1] == "+":
        s = s[1:]
    return _strict(s, base)


def _strict(s: str, base: int) -> int | None:
    value, used, overflow = _parse_integer(s, base)
    rest = s[used:] if used else s
    if overflow or not used or rest not in ("", "\n"):
        return None
    return value


def kstrtoll(s: str, base: int = 0) -> int | None:
    """kstrtoll()/kstrtol() on 64-bit."""
    if s[:1] == "-":
        v = _strict(s[1:], base)
        return None if v is None or v > 1 << 63 else -v
    v = kstrtoull(s, base)
    return None if v is None or v >= 1 << 63 else v


def kstrtouint(s: str, base: int = 0) -> int | None:
    v = kstrtoull(s, base)
    return None if v is None or v > 0xFFFFFFFF else v


def simple_strtoul(s: str) -> tuple[int, int]:
    """simple_strtoul(s, &end, 0): value and the number of chars consumed."""
    value, used, _ = _parse_integer(s, 0)
    return value, used


def is_good_name(name: str, hyphen_ok: bool = False) -> bool:
    """__is_good_name(): C identifier; 6.1.y group names may also use '-'."""
    extra = "-" if hyphen_ok else ""
    return (
        bool(name)
        and name.isascii()
        and (name[0].isalpha() or name[0] in "_" + extra)
        and all(c.isalnum() or c in "_" + extra for c in name[1:])
    )
