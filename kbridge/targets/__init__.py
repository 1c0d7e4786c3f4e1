"""Where probes run: an embedded QEMU VM (the default) or a Vagrant VM, behind one interface."""
