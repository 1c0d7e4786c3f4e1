"""Collectors: turn what each mechanism reports (dmesg, trace_pipe, bpf) into Hit records."""
