"""Files that run inside the guest: the init and the stream helper (in the image's initramfs), the eBPF
probe and its loader (bpf/: built on the host by kbridge.images.bpftools, added to the initramfs), and
scripts a guest shell runs with their input as arguments (tracefs.sh)."""

from pathlib import Path

GUEST_DIR = Path(__file__).parent
