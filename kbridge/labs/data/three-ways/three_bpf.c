/*
 * three-ways, way 3 of 3: the same probe as an eBPF program, compiled and attached
 * by bcc in the guest: count_write() is attached as a kprobe on ksys_write.
 * bcc adds the usual headers (BPF_ARRAY, bpf_get_current_comm, ...).
 */
#include <uapi/linux/ptrace.h>

BPF_ARRAY(counts, u64, 1);	/* counts[0]: the workload's ksys_write() calls */

int count_write(struct pt_regs *ctx)
{
	char comm[16] = {};

	/* TODO 1: read the current task's comm (bpf_get_current_comm) and, when it is "kblab",
	 * add one to counts[0] (counts.increment(0)) */
	bpf_get_current_comm(&comm, sizeof(comm));
	if (comm[0] == 'k' && comm[1] == 'b' && comm[2] == 'l' && comm[3] == 'a' && comm[4] == 'b' &&
	    comm[5] == 0)
		counts.increment(0);
	/* END TODO 1 */
	return 0;
}
