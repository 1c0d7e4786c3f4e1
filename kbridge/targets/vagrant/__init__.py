"""A Vagrant machine as a kbridge target, driven over OpenSSH.

The machine is found the way Vagrant users expect: `vagrant ssh-config` (and
`vagrant status`, to say why when that fails) of the Vagrantfile in the current
directory, in VAGRANT_CWD, or in the directory given. kbridge opens one SSH
control master to it; every channel below is a session on that one connection:

  run, files    a root shell (`sudo -n /bin/sh -s`) kept open: each command is one
                round trip, framed by a random marker, its stdout straight on the
                channel (no sudo, PAM or login shell per command: ~1 s each under TCG)
  spawn         `ssh ... sudo sh -c 'echo $$; exec ...'`: the guest pid first, the
                result when the ssh process ends
  kmsg          `sudo cat /dev/kmsg`
  streams       /run/kbridge/<port>, a link to the stdout of a holder process,
                which is the channel itself: trace_pipe or bcc output goes from the
                writer to sshd with no relay process a probe would see

kbridge never destroys, halts or reboots a machine it did not create: release()
only closes the control master and the readers it started.
"""

from kbridge.targets.vagrant.machine import parse_status, readiness
from kbridge.targets.vagrant.target import VagrantTarget, connect

__all__ = ["VagrantTarget", "connect", "parse_status", "readiness"]
