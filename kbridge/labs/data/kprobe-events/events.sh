# kprobe-events: a kprobe through tracefs, step by step, as the walk-through does it.
#
# `kbridge lab check .` runs each step_ function below in the guest, as root, in
# this order: define, filter, enable, (the workload runs), read, disable, remove.
# After each step it reads what the kernel's tracefs really holds. README.md
# explains every step. Fill in the TODOs; each one is one or two shell lines.

T=/sys/kernel/tracing	# tracefs; /sys/kernel/debug/tracing is the same directory

step_define() {
	# TODO 1: define a kprobe event named sys_write_event at the entry of the write
	# system call (the walk-through's "p:sys_write_event sys_write": which symbol is
	# sys_write on this kernel? it depends on the arch, see README.md)
	case "$(uname -m)" in
	x86_64) sym=__x64_sys_write ;;
	aarch64) sym=__arm64_sys_write ;;
	esac
	echo "p:sys_write_event $sym" >> $T/kprobe_events
	#@ :
	# END TODO 1
}

step_filter() {
	# TODO 2: record only the lab's workload: a filter on the event keeping the
	# task whose comm is kblab
	echo 'comm == "kblab"' > $T/events/kprobes/sys_write_event/filter
	#@ :
	# END TODO 2
}

step_enable() {
	# TODO 3: enable the event
	echo 1 > $T/events/kprobes/sys_write_event/enable
	#@ :
	# END TODO 3
}

step_read() {
	# TODO 4: print what the event recorded (the trace buffer, as text)
	cat $T/trace
	#@ :
	# END TODO 4
}

step_disable() {
	# TODO 5: disable the event
	echo 0 > $T/events/kprobes/sys_write_event/enable
	#@ :
	# END TODO 5
}

step_remove() {
	# TODO 6: remove the event definition, and only it (other tools may have events
	# defined: do not clear the whole file)
	echo '-:kprobes/sys_write_event' >> $T/kprobe_events
	#@ :
	# END TODO 6
}
