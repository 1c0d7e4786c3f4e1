"""A kernel's .config: read into CONFIG_* pairs, and checked for what kbridge needs to probe it."""

from __future__ import annotations

from kbridge.errors import KbridgeError


def parse_config(text: str) -> dict[str, str]:
    """CONFIG_* = value pairs of a kernel .config ('is not set' lines are left out)."""
    out = {}
    for ln in text.splitlines():
        if ln.startswith("CONFIG_") and "=" in ln:
            k, _, v = ln.partition("=")
            out[k] = v.strip('"')
    return out


# What kbridge needs of a kernel: kprobes, and the tracefs kprobe_events for `trace`.
REQUIRED_CONFIG = ("CONFIG_KPROBES", "CONFIG_MODULES", "CONFIG_KPROBE_EVENTS")


def check_config(config: dict[str, str], what: str) -> None:
    """A KbridgeError naming the first option kbridge needs that the kernel lacks."""
    for opt in REQUIRED_CONFIG:
        if config.get(opt) != "y":
            raise KbridgeError(
                f"{what} was built without {opt}: kbridge cannot probe it",
                "choose another --kernel (kbridge image list shows the matrix)",
            )
