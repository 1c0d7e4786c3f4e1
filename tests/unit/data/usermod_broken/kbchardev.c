// SPDX-License-Identifier: GPL-2.0
/*
 * kbchardev: a small misc character device, /dev/kbchardev, to show how a
 * driver is tested with kbridge (examples/chardev/README.md).
 *
 * write() stores up to BUF_SIZE bytes, read() returns them, and two ioctls
 * read the stored length and clear the buffer. A write larger than the buffer
 * fails with -ENOSPC through kbchardev_reject(), the error path a test can
 * make fire and probe. Loading with fail_init=1 makes init fail with -ENODEV.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/uaccess.h>

#include "kbchardev.h"

#define BUF_SIZE 64

static int debug;
static int unused_var;
module_param(debug, int, 0644);
MODULE_PARM_DESC(debug, "log every read and write (0/1)");

static bool fail_init;
module_param(fail_init, bool, 0444);
MODULE_PARM_DESC(fail_init, "make init fail with -ENODEV, to test a failed load");

static char *greeting = "hello";
module_param(greeting, charp, 0444);
MODULE_PARM_DESC(greeting, "the buffer's initial contents");

static DEFINE_MUTEX(kb_lock);
static char kb_buf[BUF_SIZE];
static size_t kb_len;
static unsigned long kb_rejects;

static int kbchardev_open(struct inode *inode, struct file *file)
{
	if (debug)
		pr_info("open by %s[%d]\n", current->comm, task_pid_nr(current));
	return 0;
}

/* The error path: kept out of line so that it has its own symbol to probe. */
static noinline ssize_t kbchardev_reject(size_t count)
{
	kb_rejects++
	undeclared_thing = 1;
	pr_warn("write of %zu bytes rejected: the buffer holds %d\n", count, BUF_SIZE);
	return -ENOSPC;
}

static ssize_t kbchardev_read(struct file *file, char __user *ubuf, size_t count, loff_t *ppos)
{
	ssize_t ret;

	mutex_lock(&kb_lock);
	ret = simple_read_from_buffer(ubuf, count, ppos, kb_buf, kb_len);
	mutex_unlock(&kb_lock);
	if (debug)
		pr_info("read %zd bytes\n", ret);
	return ret;
}

static noinline ssize_t kbchardev_write(struct file *file, const char __user *ubuf, size_t count,
					loff_t *ppos)
{
	if (count > BUF_SIZE)
		return kbchardev_reject(count);
	mutex_lock(&kb_lock);
	if (copy_from_user(kb_buf, ubuf, count)) {
		mutex_unlock(&kb_lock);
		return -EFAULT;
	}
	kb_len = count;
	mutex_unlock(&kb_lock);
	if (debug)
		pr_info("wrote %zu bytes\n", count);
	return count;
}

static long kbchardev_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	u32 len;

	switch (cmd) {
	case KBCHARDEV_GET_LEN:
		mutex_lock(&kb_lock);
		len = kb_len;
		mutex_unlock(&kb_lock);
		return put_user(len, (u32 __user *)arg);
	case KBCHARDEV_CLEAR:
		mutex_lock(&kb_lock);
		kb_len = 0;
		mutex_unlock(&kb_lock);
		return 0;
	default:
		return -ENOTTY;
	}
}

static const struct file_operations kbchardev_fops = {
	.owner = THIS_MODULE,
	.open = kbchardev_open,
	.read = kbchardev_read,
	.write = kbchardev_write,
	.unlocked_ioctl = kbchardev_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = default_llseek,
};

static struct miscdevice kbchardev_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "kbchardev",
	.fops = &kbchardev_fops,
	.mode = 0666,
};

static int __init kbchardev_init(void)
{
	ssize_t n;
	int ret;

	if (fail_init) {
		pr_err("fail_init is set: refusing to load\n");
		return -ENODEV;
	}
	n = strscpy(kb_buf, greeting, sizeof(kb_buf));
	kb_len = n < 0 ? sizeof(kb_buf) - 1 : n;	/* -E2BIG: truncated */
	ret = misc_register(&kbchardev_misc);
	if (ret) {
		pr_err("misc_register failed: %d\n", ret);
		return ret;
	}
	pr_info("ready: /dev/%s, debug=%d\n", kbchardev_misc.name, debug);
	return 0;
}

static void __exit kbchardev_exit(void)
{
	misc_deregister(&kbchardev_misc);
	pr_info("unloaded: %lu writes rejected\n", kb_rejects);
}

module_init(kbchardev_init);
module_exit(kbchardev_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kbridge example: a misc character device with read, write and ioctl");
