// SPDX-License-Identifier: GPL-2.0-only
/*
 * kretprobe_lab: a kretprobe on ksys_write(), the function behind write(2),
 * as the kernel's samples/kprobes/kretprobe_example.c does it: an entry
 * handler keeps per-call data (a timestamp and the byte count asked for), the
 * return handler reads the return value and how long the call took.
 *
 * Fill in the TODOs in order; README.md explains each one. Check with
 *   kbridge lab check .
 *
 * Only the lab's workload (comm "kblab") is measured. For the checker, the
 * module keeps exact counts in /sys/kernel/debug/kretprobe_lab/state.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/kprobes.h>
#include <linux/ptrace.h>
#include <linux/sched.h>
#include <linux/string.h>
#include <linux/ktime.h>
#include <linux/limits.h>
#include <linux/debugfs.h>
#include <linux/seq_file.h>

static char comm[TASK_COMM_LEN] = "kblab";
module_param_string(comm, comm, sizeof(comm), 0444);
MODULE_PARM_DESC(comm, "only measure tasks with this comm");

static int maxactive;
module_param(maxactive, int, 0444);
MODULE_PARM_DESC(maxactive, "kretprobe instances (0: the kernel's default)");

/* What the entry handler hands to the return handler, one per call in flight. */
struct call_data {
	ktime_t entry;		/* when the call entered ksys_write */
	size_t count;		/* the byte count it was asked to write (its 3rd argument) */
};

/* For the checker; only the handlers change them, one call at a time per task. */
static atomic_t entries, returns, mismatches;
static atomic64_t ret_sum;
static s64 min_ns = S64_MAX, max_ns;
static DEFINE_SPINLOCK(stats_lock);

static bool wanted(void)
{
	return strncmp(current->comm, comm, TASK_COMM_LEN) == 0;
}

/* Runs at the function's entry: return non-zero to not watch this call's return. */
static int entry_handler(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct call_data *data = (struct call_data *)ri->data;

	if (!wanted())
		return 1;
	/* TODO 2: keep the entry time (ktime_get()) and the count argument
	 * (regs_get_kernel_argument(regs, 2): the 3rd argument) in *data; count the entry */
	data->entry = ktime_get();
	data->count = regs_get_kernel_argument(regs, 2);
	atomic_inc(&entries);
	/* END TODO 2 */
	return 0;
}
NOKPROBE_SYMBOL(entry_handler);

/* Runs when the probed function returns, with the registers it returns with. */
static int ret_handler(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct call_data *data = (struct call_data *)ri->data;
	long retval = 0;
	s64 delta = 0;
	unsigned long flags;

	/* TODO 3: read the return value (regs_return_value(regs)) into retval and how long the
	 * call took (ktime_get() minus the entry time, in ns: ktime_to_ns) into delta */
	retval = regs_return_value(regs);
	delta = ktime_to_ns(ktime_sub(ktime_get(), data->entry));
	/* END TODO 3 */
	atomic_inc(&returns);
	atomic64_add(retval, &ret_sum);
	if (retval != (long)data->count)
		atomic_inc(&mismatches);
	spin_lock_irqsave(&stats_lock, flags);
	min_ns = min(min_ns, delta);
	max_ns = max(max_ns, delta);
	spin_unlock_irqrestore(&stats_lock, flags);
	pr_info("ksys_write returned %ld (asked %zu) and took %lld ns\n", retval, data->count,
		(long long)delta);
	return 0;
}
NOKPROBE_SYMBOL(ret_handler);

static struct kretprobe rp = {
	/* TODO 1: probe ksys_write */
	.kp.symbol_name = "ksys_write",
	/* END TODO 1 */
	/* TODO 4: attach both handlers, and say how much per-call data each instance needs */
	.entry_handler = entry_handler,
	.handler = ret_handler,
	.data_size = sizeof(struct call_data),
	/* END TODO 4 */
};

static int state_show(struct seq_file *m, void *v)
{
	seq_printf(m, "entries %d\nreturns %d\nret_sum %lld\nmismatches %d\nmin_ns %lld\nmax_ns %lld\n"
		   "nmissed %d\nmaxactive %d\n",
		   atomic_read(&entries), atomic_read(&returns), (long long)atomic64_read(&ret_sum),
		   atomic_read(&mismatches), returns.counter ? (long long)min_ns : 0LL, (long long)max_ns,
		   rp.nmissed, rp.maxactive);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(state);

static struct dentry *dir;

static int __init kretprobe_lab_init(void)
{
	int ret = 0;

	/* TODO 5: use the maxactive parameter when it is set (rp.maxactive: how many calls can be
	 * watched at once; calls beyond that are counted in rp.nmissed), then register the
	 * kretprobe; on failure print the error and return it */
	if (maxactive > 0)
		rp.maxactive = maxactive;
	ret = register_kretprobe(&rp);
	if (ret < 0) {
		pr_err("register_kretprobe failed, returned %d\n", ret);
		return ret;
	}
	pr_info("planted return probe at %s: %px\n", rp.kp.symbol_name, rp.kp.addr);
	/* END TODO 5 */
	dir = debugfs_create_dir(KBUILD_MODNAME, NULL);
	debugfs_create_file("state", 0444, dir, NULL, &state_fops);
	return 0;
}

static void __exit kretprobe_lab_exit(void)
{
	debugfs_remove_recursive(dir);
	/* TODO 6: unregister the kretprobe and report how many calls were missed (rp.nmissed) */
	unregister_kretprobe(&rp);
	pr_info("kretprobe at %px unregistered, missed %d calls\n", rp.kp.addr, rp.nmissed);
	/* END TODO 6 */
}

module_init(kretprobe_lab_init);
module_exit(kretprobe_lab_exit);
MODULE_LICENSE("GPL");
