// SPDX-License-Identifier: GPL-2.0-only
/*
 * three_lab: way 1 of 3, a kprobe module counting ksys_write() calls by the
 * workload (comm "kblab") in /sys/kernel/debug/three_lab/state.
 * Ways 2 and 3 are event.txt (tracefs) and three_bpf.c (eBPF); README.md
 * explains all three. `kbridge lab check .` runs the three at once.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/kprobes.h>
#include <linux/sched.h>
#include <linux/string.h>
#include <linux/atomic.h>
#include <linux/debugfs.h>
#include <linux/seq_file.h>

static atomic_t hits;

static int handler_pre(struct kprobe *p, struct pt_regs *regs)
{
	/* TODO 2: count the call in hits when the current task's comm is "kblab" */
	if (strncmp(current->comm, "kblab", TASK_COMM_LEN) == 0)
		atomic_inc(&hits);
	/* END TODO 2 */
	return 0;
}

static struct kprobe kp = {
	/* TODO 1: probe ksys_write with handler_pre */
	.symbol_name = "ksys_write",
	.pre_handler = handler_pre,
	/* END TODO 1 */
};

static int state_show(struct seq_file *m, void *v)
{
	seq_printf(m, "hits %d\nnmissed %lu\n", atomic_read(&hits), kp.nmissed);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(state);

static struct dentry *dir;

static int __init three_lab_init(void)
{
	int ret = 0;

	/* TODO 3: register the kprobe; on failure return the error */
	ret = register_kprobe(&kp);
	if (ret < 0)
		return ret;
	/* END TODO 3 */
	dir = debugfs_create_dir(KBUILD_MODNAME, NULL);
	debugfs_create_file("state", 0444, dir, NULL, &state_fops);
	return 0;
}

static void __exit three_lab_exit(void)
{
	debugfs_remove_recursive(dir);
	/* TODO 4: unregister the kprobe */
	unregister_kprobe(&kp);
	/* END TODO 4 */
}

module_init(three_lab_init);
module_exit(three_lab_exit);
MODULE_LICENSE("GPL");
