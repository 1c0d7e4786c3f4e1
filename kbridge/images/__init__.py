"""Guest images (kernel, headers, initramfs) built from Debian packages and cached."""
