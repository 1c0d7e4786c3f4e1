/* SPDX-License-Identifier: GPL-2.0 */
/*
 * What probe.bpf.c and the loader (loader.c) share: the load-time configuration (.rodata,
 * written by the loader before the object is loaded) and the hit record.
 *
 * Both are little-endian on every arch kbridge runs (x86_64, arm64), and the host decodes the
 * record with Python's struct (kbridge/mechanisms/bpf/collect.py): keep it in step with any
 * change here (KB_FORMAT is in the loader's "ready" message and checked there).
 */
#ifndef KB_EVENT_H
#define KB_EVENT_H

#define KB_FORMAT 2
#define KB_MAX_ARGS 8		/* arm64 passes 8 arguments in registers, x86_64 6 */
#define KB_COMM_LEN 16		/* TASK_COMM_LEN */

/* Handler ids, as kbridge names them (kbridge/mechanisms/bpf/collect.py HANDLERS). */
enum { KB_PRE = 0, KB_POST = 1, KB_ENTRY = 2, KB_RET = 3, KB_NHANDLERS = 4 };

/* Per-CPU counters (summed by the loader): every hit that passed the filters, by handler,
 * and the ones the ring buffer had no room for. hits[h] == streamed[h] + lost[h], exactly. */
enum {
	KB_CNT_HITS = 0,			/* + handler */
	KB_CNT_LOST = KB_NHANDLERS,		/* + handler */
	KB_CNT_NOSLOT = 2 * KB_NHANDLERS,	/* entries not remembered for their return (inflight full) */
	KB_NCOUNTERS,
};

/*
 * kb_config.arg_reg[i] is a register number of probe.bpf.c's KB_REG table, in the order
 * kbridge's Arch.bpf_registers lists them (the host maps argument positions to them):
 * x86_64: 0 di, 1 si, 2 dx, 3 cx, 4 r8, 5 r9, 6 r10 (the syscall ABI's 4th); arm64: x0..x7.
 */
struct kb_config {
	__u32 tgid;			/* only this process (0: any) */
	__u32 tid;			/* only this thread (0: any) */
	__u32 nargs;			/* arguments to fetch, arg_reg[0..nargs) */
	__u8 arg_reg[KB_MAX_ARGS];
	__u8 syscall;			/* a syscall wrapper: read args from the user pt_regs it gets */
	__u8 has_comm;			/* only tasks whose comm is exactly comm */
	__u8 emit_entry;		/* kb_entry sends an "entry" hit */
	__u8 track_ret;			/* kb_entry remembers args and time for kb_ret */
	__u8 have_func_ip;		/* bpf_get_func_ip works in kprobes (5.15+) */
	__u8 pad[3];
	char comm[KB_COMM_LEN];
};

/* One hit. The loader sends the first KB_EVENT_FIXED + 8 * nargs bytes of it. */
struct kb_event {
	__u64 ts;			/* bpf_ktime_get_ns() */
	__u64 addr;			/* the probe address (bpf_get_func_ip, 5.15+), else 0; 0 on return */
	__u64 ip;			/* ip / pc as the program saw it; 0 on return */
	__u64 flags;			/* flags / pstate; 0 on return */
	__s64 ret;			/* the return value, on return */
	__u64 duration;			/* ns since the matching entry, on return */
	__u32 pid;			/* tgid */
	__u32 tid;
	__u16 cpu;
	__u8 handler;			/* KB_PRE, KB_ENTRY, KB_RET */
	__u8 nargs;
	char comm[KB_COMM_LEN];
	__u32 pad;
	__u64 args[KB_MAX_ARGS];
};

#define KB_EVENT_FIXED 80		/* offsetof(struct kb_event, args) */

#endif
