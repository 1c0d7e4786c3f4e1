// SPDX-License-Identifier: GPL-2.0-only
/*
 * old_lab: the kprobe APIs the walk-through used, on Linux 5.10.
 *
 * - jprobes (gone since 4.15) gave a handler with the probed function's own
 *   signature, to read its arguments. Their replacement: read the arguments
 *   from the registers in a kprobe pre-handler (regs_get_kernel_argument).
 * - fault_handler (gone since 5.14) ran when a handler faulted. Here the
 *   pre-handler faults on purpose, reading user address 0 with
 *   copy_from_user_nofault(), so the fault_handler fires.
 *
 * This module only builds for kernels before 5.14 (`kbridge lab check .`
 * runs it on 5.10). Fill in the TODOs; README.md explains each one.
 * Only the lab's workload (comm "kblab") is counted, in
 * /sys/kernel/debug/old_lab/state.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/kprobes.h>
#include <linux/ptrace.h>
#include <linux/sched.h>
#include <linux/string.h>
#include <linux/uaccess.h>
#include <linux/atomic.h>
#include <linux/debugfs.h>
#include <linux/seq_file.h>

static char comm[TASK_COMM_LEN] = "kblab";
module_param_string(comm, comm, sizeof(comm), 0444);
MODULE_PARM_DESC(comm, "only count tasks with this comm");

static atomic_t calls, faults, bad_fd;
static atomic64_t count_sum;
static atomic_t last_trap;

static bool wanted(void)
{
	return strncmp(current->comm, comm, TASK_COMM_LEN) == 0;
}

/*
 * With a jprobe this was
 *   static long j_ksys_write(unsigned int fd, const char __user *buf, size_t count)
 *   { ...; jprobe_return(); return 0; }
 * A pre-handler gets the registers instead, and reads the arguments from them.
 */
static int handler_pre(struct kprobe *p, struct pt_regs *regs)
{
	unsigned long fd = 0, count = 0;
	char byte;

	if (!wanted())
		return 0;
	/* TODO 2: read ksys_write's 1st and 3rd arguments (fd, count) from regs */
	fd = regs_get_kernel_argument(regs, 0);
	count = regs_get_kernel_argument(regs, 2);
	/* END TODO 2 */
	atomic_inc(&calls);
	atomic64_add(count, &count_sum);
	if (fd < 3)	/* the workload writes to /dev/null, which it opened: fd 3 */
		atomic_inc(&bad_fd);
	/* TODO 3: fault on purpose: read one byte from user address 0 into byte with
	 * copy_from_user_nofault() (it returns non-zero instead of crashing) */
	if (copy_from_user_nofault(&byte, (const void __user *)0, 1))
		pr_debug("reading user address 0 faulted, as intended\n");
	/* END TODO 3 */
	return 0;
}

/* Runs when a handler of this kprobe faults (before the kernel's own fixup). Gone in 5.14. */
static int handler_fault(struct kprobe *p, struct pt_regs *regs, int trapnr)
{
	/* TODO 4: count the fault in faults and keep trapnr in last_trap; return 0 so the
	 * kernel's exception fixup makes copy_from_user_nofault() fail gracefully */
	atomic_inc(&faults);
	atomic_set(&last_trap, trapnr);
	/* END TODO 4 */
	return 0;
}

static struct kprobe kp = {
	/* TODO 1: probe ksys_write, and attach the pre-handler and the fault handler */
	.symbol_name = "ksys_write",
	.pre_handler = handler_pre,
	.fault_handler = handler_fault,
	/* END TODO 1 */
};

static int state_show(struct seq_file *m, void *v)
{
	seq_printf(m, "calls %d\ncount_sum %lld\nbad_fd %d\nfaults %d\nlast_trap %d\nnmissed %lu\n",
		   atomic_read(&calls), (long long)atomic64_read(&count_sum), atomic_read(&bad_fd),
		   atomic_read(&faults), atomic_read(&last_trap), kp.nmissed);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(state);

static struct dentry *dir;

static int __init old_lab_init(void)
{
	int ret = 0;

	/* TODO 5: register the kprobe; on failure print the error and return it */
	ret = register_kprobe(&kp);
	if (ret < 0) {
		pr_err("register_kprobe failed, returned %d\n", ret);
		return ret;
	}
	/* END TODO 5 */
	dir = debugfs_create_dir(KBUILD_MODNAME, NULL);
	debugfs_create_file("state", 0444, dir, NULL, &state_fops);
	return 0;
}

static void __exit old_lab_exit(void)
{
	debugfs_remove_recursive(dir);
	/* TODO 6: unregister the kprobe */
	unregister_kprobe(&kp);
	/* END TODO 6 */
}

module_init(old_lab_init);
module_exit(old_lab_exit);
MODULE_LICENSE("GPL");
