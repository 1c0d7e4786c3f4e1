// SPDX-License-Identifier: GPL-2.0
/*
 * kbring: a misc device whose ioctl has a NULL dereference, the driver bug kbridge's
 * crash reports are tested with (tests/vm/test_crashes.py). /dev/kbring, ioctls in kbring.h.
 */
#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/module.h>

#include "kbring.h"

struct kbring_slot {
	long value;
};

static struct kbring_slot *kbring_current;	/* never set: the bug */

static long kbring_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	switch (cmd) {
	case KBRING_PING:
		return 0;
	case KBRING_OOPS:
		return READ_ONCE(kbring_current->value);	/* faults: kbring_current is NULL */
	default:
		return -ENOTTY;
	}
}

static const struct file_operations kbring_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = kbring_ioctl,
};

static struct miscdevice kbring_dev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "kbring",
	.fops = &kbring_fops,
};

module_misc_device(kbring_dev);
MODULE_LICENSE("GPL");
