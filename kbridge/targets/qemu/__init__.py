"""kbridge's embedded QEMU guest: QemuVM (vm.py), its process, run directories, command line, the agent,
KVM and saved states."""

from kbridge.targets.qemu.kvm import kvm_usable
from kbridge.targets.qemu.rundirs import kept_dir, kept_dirs, kept_key
from kbridge.targets.qemu.strays import orphans
from kbridge.targets.qemu.vm import QemuVM

__all__ = ["QemuVM", "kept_dir", "kept_dirs", "kept_key", "kvm_usable", "orphans"]
