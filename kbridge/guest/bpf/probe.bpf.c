// SPDX-License-Identifier: GPL-2.0
/*
 * kbridge's eBPF probe (--via bpf): one CO-RE object per guest kernel that serves every probe
 * kbridge plants. Compiled on the host (clang -target bpf) against the vmlinux.h that bpftool
 * makes from that kernel's BTF, loaded in the guest by loader.c (kbridge/images/bpftools.py).
 *
 * kb_pre is a kprobe at SYMBOL+OFFSET, kb_entry a kprobe at SYMBOL (a kretprobe's entry:
 * it remembers the arguments and the time per thread), kb_ret the kretprobe (return value,
 * duration since the entry). The symbol and offset are given when the loader attaches;
 * the filters and which arguments to read are load-time configuration in .rodata (the
 * loader writes them before loading, and the verifier then drops the branches a probe
 * does not use), so nothing is compiled per probe.
 *
 * Output: each hit that passes the filters is counted in a per-CPU array (exact) and sent
 * through the BPF ring buffer; a hit with no room there is counted as lost, per handler.
 * The loader (loader.c) streams the records and prints the counts.
 */
#include "vmlinux.h"		/* bpftool btf dump file vmlinux.btf format c */
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "kb_event.h"

char LICENSE[] SEC("license") = "GPL";	/* bpf_probe_read_kernel and friends are GPL-only */

const volatile struct kb_config cfg = {};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 16 << 20);	/* the loader may resize it (--ringbuf-mb) */
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, KB_NCOUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u8);
} excluded SEC(".maps");	/* tgids never counted: kbridge's guest plumbing, the loader */

struct kb_inflight {
	__u64 args[KB_MAX_ARGS];
	__u64 ts;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 10240);	/* the loader shrinks it to 1 when no return is wanted */
	__type(key, __u64);		/* pid_tgid: one thread is in at most one call at a time ... */
	__type(value, struct kb_inflight);	/* ... unless the function recurses (as with bcc) */
} inflight SEC(".maps");

static __always_inline void kb_count(__u32 idx)
{
	__u64 *n = bpf_map_lookup_elem(&counts, &idx);

	if (n)
		*n += 1;	/* per-CPU: no atomics needed, the loader sums the CPUs */
}

static __always_inline bool kb_wanted(void)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;

	if (cfg.tgid && tgid != cfg.tgid)
		return false;
	if (cfg.tid && (__u32)id != cfg.tid)
		return false;
	if (bpf_map_lookup_elem(&excluded, &tgid))
		return false;
	if (cfg.has_comm) {
		/* bpf_get_current_comm NUL-pads to the size: compare all 16 bytes, an exact match. */
		__u64 comm[2] = {};

		bpf_get_current_comm(comm, sizeof(comm));
		if (comm[0] != ((const volatile __u64 *)cfg.comm)[0] ||
		    comm[1] != ((const volatile __u64 *)cfg.comm)[1])
			return false;
	}
	return true;
}

/*
 * Register N of R, N from .rodata: the verifier knows its value and drops the other cases.
 * R is the probe's context or, for a syscall wrapper, the user pt_regs it points to. Both
 * are read with BPF_CORE_READ (bpf_probe_read_kernel), even the context: clang merges the
 * cases into one load at ctx + variable offset, which the verifier refuses for a context
 * ("dereference of modified ctx ptr"). Field names come from vmlinux.h, relocated by CO-RE.
 */
#ifdef __TARGET_ARCH_x86
#define KB_REG(get, r, n)							\
	((n) == 0 ? get(r, di) : (n) == 1 ? get(r, si) : (n) == 2 ? get(r, dx) : \
	 (n) == 3 ? get(r, cx) : (n) == 4 ? get(r, r8) : (n) == 5 ? get(r, r9) : \
	 (n) == 6 ? get(r, r10) : 0)
#define KB_ARG0(r) ((r)->di)
#define KB_IP(r) ((r)->ip)
#define KB_FLAGS(r) ((r)->flags)
#define KB_RC(r) ((r)->ax)
#elif defined(__TARGET_ARCH_arm64)
#define KB_REG(get, r, n)							\
	((n) == 0 ? get(r, regs[0]) : (n) == 1 ? get(r, regs[1]) : (n) == 2 ? get(r, regs[2]) : \
	 (n) == 3 ? get(r, regs[3]) : (n) == 4 ? get(r, regs[4]) : (n) == 5 ? get(r, regs[5]) : \
	 (n) == 6 ? get(r, regs[6]) : (n) == 7 ? get(r, regs[7]) : 0)
#define KB_ARG0(r) ((r)->regs[0])
#define KB_IP(r) ((r)->pc)
#define KB_FLAGS(r) ((r)->pstate)
#define KB_RC(r) ((r)->regs[0])
#else
#error "build with -D__TARGET_ARCH_x86 or -D__TARGET_ARCH_arm64"
#endif
#define KB_CORE(r, f) BPF_CORE_READ(r, f)

static __always_inline void kb_fetch_args(struct pt_regs *ctx, __u64 *args)
{
	/* __x64_sys_* / __arm64_sys_*: the only argument is the user's pt_regs. */
	struct pt_regs *r = cfg.syscall ? (struct pt_regs *)KB_ARG0(ctx) : ctx;

#pragma unroll
	for (int i = 0; i < KB_MAX_ARGS; i++)
		if (i < cfg.nargs)
			args[i] = KB_REG(KB_CORE, r, cfg.arg_reg[i]);
}

static __always_inline void kb_emit(struct pt_regs *ctx, __u8 handler, const __u64 *args,
				    __s64 ret, __u64 duration)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct kb_event *e;

	kb_count(KB_CNT_HITS + handler);
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		kb_count(KB_CNT_LOST + handler);	/* the ring buffer is full */
		return;
	}
	e->ts = bpf_ktime_get_ns();
	e->pid = id >> 32;
	e->tid = (__u32)id;
	e->cpu = bpf_get_smp_processor_id();
	e->handler = handler;
	e->nargs = cfg.nargs;
	e->ret = ret;
	e->duration = duration;
	e->addr = 0;
	e->ip = 0;
	e->flags = 0;
	e->pad = 0;
	if (handler != KB_RET) {
		/* 5.10 has no bpf_get_func_ip for kprobes (the load would fail): the loader
		 * probes for it and the verifier drops this call when it is missing. */
		if (cfg.have_func_ip)
			e->addr = bpf_get_func_ip(ctx);
		e->ip = KB_IP(ctx);
		e->flags = KB_FLAGS(ctx);
	}
#pragma unroll
	for (int i = 0; i < KB_MAX_ARGS; i++)
		e->args[i] = args[i];
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	bpf_ringbuf_submit(e, 0);
}

SEC("kprobe")
int kb_pre(struct pt_regs *ctx)
{
	__u64 args[KB_MAX_ARGS] = {};

	if (!kb_wanted())
		return 0;
	kb_fetch_args(ctx, args);
	kb_emit(ctx, KB_PRE, args, 0, 0);
	return 0;
}

SEC("kprobe")
int kb_entry(struct pt_regs *ctx)
{
	struct kb_inflight a = {};
	__u64 id = bpf_get_current_pid_tgid();

	if (!kb_wanted())
		return 0;
	kb_fetch_args(ctx, a.args);
	a.ts = bpf_ktime_get_ns();
	if (cfg.track_ret && bpf_map_update_elem(&inflight, &id, &a, BPF_ANY))
		kb_count(KB_CNT_NOSLOT);	/* its return will not be seen */
	if (cfg.emit_entry)
		kb_emit(ctx, KB_ENTRY, a.args, 0, 0);
	return 0;
}

SEC("kretprobe")
int kb_ret(struct pt_regs *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct kb_inflight *a = bpf_map_lookup_elem(&inflight, &id);

	if (!a)
		return 0;	/* the entry was filtered out (or not seen) */
	kb_emit(ctx, KB_RET, a->args, (__s64)KB_RC(ctx), bpf_ktime_get_ns() - a->ts);
	bpf_map_delete_elem(&inflight, &id);
	return 0;
}
