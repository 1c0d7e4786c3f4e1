"""Files that run inside the guest: the init and the stream helper (in the image's initramfs), the eBPF
probe and its loader (bpf/: built on the host by kbridge.images.bpftools, added to the initramfs), and
scripts a guest shell runs with their input as arguments (tracefs.sh)."""

from pathlib import Path

GUEST_DIR = Path(__file__).parent

# The per-CPU ring buffer a tracefs run wants (KiB): 16 MiB holds a burst of hits while the host
# reads trace_pipe. kbridge's VMs boot with it (trace_buf_size=), so a run does not resize the
# buffer and put it back: a resize to 16 MiB takes 0.08-0.28 s of an emulated guest's time (TCG).
TRACE_BUFFER_KB = 16384
