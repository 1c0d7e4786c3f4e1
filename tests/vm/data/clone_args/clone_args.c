// SPDX-License-Identifier: GPL-2.0
/*
 * clone_args: a function the compiler clones. Every caller passes ignored=0 and arg=2,
 * and ignored is never read, so gcc -O2 emits clone_target.constprop.0 (or .isra.0)
 * taking only cmd: its first argument register holds the source's second parameter.
 * Writing N to /sys/module/clone_args/parameters/trigger calls clone_target(0, N, 2).
 */
#include <linux/module.h>
#include <linux/moduleparam.h>

static noinline long clone_target(long ignored, long cmd, long arg)
{
	pr_info("clone_args: clone_target cmd=%ld arg=%ld\n", cmd, arg);
	return cmd * 31 + arg;
}

static long last;

static int trigger_set(const char *val, const struct kernel_param *kp)
{
	long cmd;
	int err = kstrtol(val, 0, &cmd);

	if (err)
		return err;
	last = clone_target(0, cmd, 2);
	return 0;
}

static const struct kernel_param_ops trigger_ops = {
	.set = trigger_set,
	.get = param_get_long,
};
module_param_cb(trigger, &trigger_ops, &last, 0644);
MODULE_PARM_DESC(trigger, "write N: calls clone_target(0, N, 2)");

MODULE_LICENSE("GPL");
