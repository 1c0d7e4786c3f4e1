"""A Vagrant machine as a kbridge target, driven over OpenSSH.

The machine is found the way Vagrant users expect: `vagrant ssh-config` (and
`vagrant status`, to pick the running machine or say why none can be used) of the
Vagrantfile in the current directory, in VAGRANT_CWD, or in the directory given
(--vagrantfile). kbridge opens one SSH connection to it per command (per Guest in the
Python API); every channel below is a session on that one connection:

  agent serve   kbridge's agent (kbridge/guest/agent.c) as root through sudo: runs each
                command as its child and does each file operation itself, one request at
                a time, and holds the machine's lock while kbridge is connected
  agent copy    the kernel log (/dev/kmsg)
  agent hold    /run/kbridge/<port>, a link to its own stdout, which is the channel
                itself: trace_pipe or bcc output goes from the writer to sshd with no
                relay process a probe would see

Each helper says its pid and its parents' (sudo, sshd) when it starts, before anything
is armed: a probe excludes them all by tgid. kbridge never destroys, halts or reboots a
machine: release() closes the channels and the connection.
"""

from kbridge.targets.vagrant.machine import parse_status, readiness
from kbridge.targets.vagrant.target import VagrantTarget, connect, known_arch

__all__ = ["VagrantTarget", "connect", "known_arch", "parse_status", "readiness"]
