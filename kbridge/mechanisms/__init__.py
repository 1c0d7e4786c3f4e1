"""The three ways to drive a kprobe, each from a ProbeSpec to a MechanismResult.

kmod: a generated kernel module; tracefs: kprobe_events; bpf: bcc in the guest.
"""
