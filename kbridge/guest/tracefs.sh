# kbridge's tracefs run, in the guest: kbridge.mechanisms.tracefs runs it with `sh -c` and passes
# everything as arguments (the event lines, the filter, the ledger records): nothing of the user's is
# ever part of this text. One guest command each to arm, to stop and to undo a run, instead of one
# agent round trip per tracefs file operation (`kbridge trace --steps` still does them one by one).
#
#   arm DIR LEDGER RECORDS READER_TAG READER_RECORD USER_KB DEFAULT_KB PORT TOKEN FILTER USER_FILTER LINE NAME...
#   stop DIR TOKEN
#   undo DIR LEDGER RELEASES
#
# DIR (under /run/kbridge) keeps what a run changed: the state to restore, the events it defined, the
# reader's pid. Output lines (stdout) say what happened: "ok READER", "clash same|other ...",
# "define-failed I", "filter-failed I", with the files the host needs to explain it (E0/E1: error_log
# before/after, S0/S1: per-CPU stats before/after, P: kprobe_profile, L: kprobes/list, K: kprobe_events).
T=/sys/kernel/tracing
bb=/bin/busybox # every tool from busybox: a Vagrant box has no coreutils

prefixed() { # prefixed TAG FILE: FILE's lines, each after TAG
	while IFS= read -r l || [ -n "$l" ]; do printf '%s %s\n' "$1" "$l"; done < "$2"
}

stats() { # stats TAG: every CPU's ring buffer stats
	for c in "$T"/per_cpu/cpu*; do
		while IFS= read -r l; do printf '%s %s %s\n' "$1" "${c##*/}" "$l"; done < "$c/stats"
	done
}

# Shell builtins where a busybox applet would do: each applet is a fork and exec, 7-9 ms of an
# emulated guest's time (TCG), and stop and undo run after the last hit, on the way to exit.
names() { # the events this run defined, in order
	n=0 k=0
	[ -s "$dir/defined" ] && read -r n < "$dir/defined"
	while [ "$k" -lt "$n" ] && IFS= read -r name; do
		printf '%s\n' "$name"
		k=$((k + 1))
	done < "$dir/names"
}

copy() { # copy FROM TO: a short text file (error_log, kprobe_events), line by line
	while IFS= read -r l || [ -n "$l" ]; do printf '%s\n' "$l"; done < "$1" > "$2"
}

cmd=$1
shift
case $cmd in
arm)
	dir=$1 ledger=$2 records=$3 tag=$4 reader_record=$5 user_kb=$6 default_kb=$7 port=$8 token=$9
	shift 9
	filter=$1 user_filter=$2
	shift 2
	$bb mkdir -p "$dir" || exit 1
	# One arming at a time, and none while a command reclaims (kbridge.targets.ownership.ARMING): a
	# kbridge killed meanwhile leaves this script running on, and its events must be recorded and
	# defined before the next command reads the ledger. A holder that died leaves a stale lock.
	lock=/run/kbridge/arming n=0
	until $bb mkdir "$lock" 2> /dev/null; do
		h=$($bb cat "$lock/pid" 2> /dev/null)
		if [ -n "$h" ] && [ ! -d "/proc/$h" ]; then
			$bb rm -rf "$lock"
			continue
		fi
		n=$((n + 1))
		[ "$n" -lt 600 ] || exit 1
		$bb sleep 0.05
	done
	echo $$ > "$lock/pid"
	trap '$bb rm -rf "$lock"' EXIT
	: > "$dir/lines"
	: > "$dir/names"
	while [ $# -ge 2 ]; do
		printf '%s\n' "$1" >> "$dir/lines"
		printf '%s\n' "$2" >> "$dir/names"
		shift 2
	done
	# What the run may change, to put back as it was.
	copy "$T/kprobe_events" "$dir/kprobe_events"
	read -r size < "$T/buffer_size_kb"
	case $size in
	*expanded:*) size=${size##*expanded: } size=${size%)} ;; # 7 (expanded: 1408): 1408 once tracing is used
	*) size=${size%% *} ;;
	esac
	read -r on < "$T/tracing_on"
	printf '%s\n' "$size" > "$dir/buffer_size_kb"
	printf '%s\n' "$on" > "$dir/tracing_on"
	# Another event of the same name would make trace_pipe's lines ambiguous, or be removed with ours.
	while IFS= read -r name; do
		while read -r def rest; do
			full=${def#*:}
			if [ "$full" = "$name" ]; then
				printf 'clash same %s %s %s\n' "$name" "$def" "$rest"
				exit 3
			fi
			if [ "${full#*/}" = "${name#*/}" ]; then
				printf 'clash other %s %s %s %s\n' "$name" "$full" "$def" "$rest"
				exit 3
			fi
		done < "$dir/kprobe_events"
	done < "$dir/names"
	want=$user_kb
	if [ -z "$want" ] && [ "$size" -lt "$default_kb" ]; then want=$default_kb; fi
	if [ -n "$want" ]; then
		echo "$want" > "$T/buffer_size_kb" || exit 1
		echo "$want" > "$dir/buffer_set"
	fi
	[ "$on" = 1 ] || echo 1 > "$T/tracing_on"
	# Recorded before they exist: a killed kbridge's events and reader are removed by the next command.
	printf '%s\n%s\n' "$records" "$reader_record" >> "$ledger" || exit 126
	i=0
	while IFS= read -r line <&3; do
		copy "$T/error_log" "$dir/error_log" 2>/dev/null
		if ! { printf '%s\n' "$line" >> "$T/kprobe_events"; } 2> "$dir/why"; then
			echo "define-failed $((i + 1))"
			prefixed W "$dir/why"
			prefixed E0 "$dir/error_log"
			copy "$T/error_log" "$dir/error_log" 2>/dev/null
			prefixed E1 "$dir/error_log"
			exit 4
		fi
		i=$((i + 1))
		echo "$i" > "$dir/defined"
	done 3< "$dir/lines"
	: > "$T/trace"
	stats S0
	# trace_pipe to the host, in a session of its own, with the tag that makes it reclaimable.
	KBRIDGE_OWNED=$tag $bb setsid $bb sh -c 'exec /bin/busybox cat "$1" > "$2"' kbridge-stream "$T/trace_pipe" "$port" \
		< /dev/null > /dev/null 2>&1 &
	reader=$!
	echo "$reader" > "$dir/reader"
	# Neither the reader nor this shell, whose own writes after enabling (its output) would be hits.
	filter="${filter:+$filter && }common_pid != $reader && common_pid != $$"
	i=0
	while IFS= read -r name; do
		i=$((i + 1))
		for f in "$user_filter" "$filter"; do # the user's alone first: the kernel's caret points into it
			[ -n "$f" ] || continue
			copy "$T/error_log" "$dir/error_log" 2>/dev/null
			if ! { printf '%s\n' "$f" > "$T/events/$name/filter"; } 2> /dev/null; then
				echo "filter-failed $i"
				prefixed E0 "$dir/error_log"
				copy "$T/error_log" "$dir/error_log" 2>/dev/null
				prefixed E1 "$dir/error_log"
				prefixed F "$T/events/$name/filter"
				exit 5
			fi
		done
	done < "$dir/names"
	# The start marker precedes every event of this run in trace_pipe: nothing is enabled yet.
	printf 'kbridge-start-%s\n' "$token" > "$T/trace_marker"
	while IFS= read -r name; do
		echo 1 > "$T/events/$name/enable" || exit 1
	done < "$dir/names"
	prefixed L /sys/kernel/debug/kprobes/list
	echo "ok $reader"
	;;
stop)
	dir=$1 token=$2
	names | while IFS= read -r name; do echo 0 > "$T/events/$name/enable"; done
	printf 'kbridge-end-%s\n' "$token" > "$T/trace_marker"
	stats S1
	prefixed P "$T/kprobe_profile"
	;;
undo)
	dir=$1 ledger=$2 releases=$3
	[ -d "$dir" ] || exit 0
	failed=0
	names | while IFS= read -r name; do echo 0 > "$T/events/$name/enable"; done
	if [ -s "$dir/reader" ]; then
		read -r reader < "$dir/reader"
		kill -9 "-$reader" "$reader" 2> /dev/null
	fi
	reversed=
	for name in $(names); do reversed="$name $reversed"; done
	for name in $reversed; do
		if ! { printf -- '-:%s\n' "$name" >> "$T/kprobe_events"; } 2> /dev/null; then
			echo "failed remove $name"
			failed=1
		fi
	done
	if [ -e "$dir/buffer_set" ]; then
		$bb cat "$dir/buffer_size_kb" > "$T/buffer_size_kb" || { echo "failed restore buffer_size_kb"; failed=1; }
	fi
	read -r was < "$dir/tracing_on"
	if [ "$was" != 1 ]; then
		$bb cat "$dir/tracing_on" > "$T/tracing_on" || { echo "failed restore tracing_on"; failed=1; }
	fi
	if ! $bb cmp -s "$T/kprobe_events" "$dir/kprobe_events"; then
		echo "differs"
		prefixed K "$T/kprobe_events"
		failed=1
	fi
	[ "$failed" = 1 ] || printf '%s\n' "$releases" >> "$ledger"
	$bb rm -r "$dir"
	exit "$failed"
	;;
*)
	echo "usage: arm|stop|undo ..." >&2
	exit 2
	;;
esac
