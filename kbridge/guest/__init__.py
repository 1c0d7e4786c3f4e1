"""Files that run inside the guest; the image builder copies them into the initramfs."""

from pathlib import Path

GUEST_DIR = Path(__file__).parent
