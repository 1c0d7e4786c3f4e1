// SPDX-License-Identifier: GPL-2.0
/*
 * kbdebug: bugs on demand, to see what kbridge does with what a debug kernel reports
 * (tests/vm/test_debugkernel.py).
 *
 * Writing a word to /sys/kernel/debug/kbdebug/trigger runs one bug; the
 * sanitizer's report goes to the kernel log:
 *   uaf     a slab use-after-free read (KASAN)
 *   kfence  a use-after-free read of a KFENCE-sampled object (KFENCE)
 *   ab, ba  two mutexes taken in opposite orders (lockdep: the second one reports)
 *   gfp     kmalloc(GFP_KERNEL), which may sleep, under a spinlock (DEBUG_ATOMIC_SLEEP:
 *           might_sleep() reports it, nothing sleeps)
 *   sleep   msleep() under a spinlock (it does sleep: "scheduling while atomic" too)
 *   oob     an out-of-bounds array index (UBSAN)
 *   hello   no bug: kbdebug_poke() for a gdb breakpoint
 *   warn    a WARN_ON (every kernel reports it, Debian's stock one too)
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/debugfs.h>
#include <linux/delay.h>
#include <linux/kfence.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/string.h>
#include <linux/uaccess.h>

static struct dentry *dir;
static char *init_bug = "";
module_param(init_bug, charp, 0444);
MODULE_PARM_DESC(init_bug, "uaf: a use-after-free in the module's init (KASAN reports it at load)");
static DEFINE_MUTEX(lock_a);
static DEFINE_MUTEX(lock_b);
static DEFINE_SPINLOCK(spin);
static int table[4];
static volatile int oob_index = 4;

struct kbdebug_obj {
	int value;
	char name[28];
};

static noinline int kbdebug_uaf(void)
{
	struct kbdebug_obj *obj = kmalloc(sizeof(*obj), GFP_KERNEL);
	int v;

	if (!obj)
		return -ENOMEM;
	obj->value = 42;
	kfree(obj);
	v = READ_ONCE(obj->value); /* the bug */
	pr_info("uaf read %d\n", v);
	return 0;
}

static noinline int kbdebug_kfence(void)
{
	int i;

	/* KFENCE samples one allocation per interval (100 ms): wait for one. */
	for (i = 0; i < 500; i++) {
		char *p = kmalloc(64, GFP_KERNEL);

		if (!p)
			return -ENOMEM;
		if (is_kfence_address(p)) {
			char c;

			kfree(p);
			c = READ_ONCE(p[0]); /* the bug */
			pr_info("kfence object after %d tries, read %d\n", i, c);
			return 0;
		}
		kfree(p);
		msleep(20);
	}
	pr_info("no KFENCE allocation in %d tries\n", i);
	return -EAGAIN;
}

static noinline void kbdebug_lock_ab(void)
{
	mutex_lock(&lock_a);
	mutex_lock(&lock_b);
	mutex_unlock(&lock_b);
	mutex_unlock(&lock_a);
}

static noinline void kbdebug_lock_ba(void)
{
	mutex_lock(&lock_b);
	mutex_lock(&lock_a); /* the inverse order: lockdep reports here */
	mutex_unlock(&lock_a);
	mutex_unlock(&lock_b);
}

static noinline void kbdebug_sleep_atomic(void)
{
	spin_lock(&spin);
	msleep(1); /* the bug */
	spin_unlock(&spin);
}

static noinline void kbdebug_gfp_atomic(void)
{
	void *p;

	spin_lock(&spin);
	p = kmalloc(64, GFP_KERNEL); /* the bug: GFP_KERNEL may sleep; a spinlock is held */
	spin_unlock(&spin);
	kfree(p);
}

static noinline int kbdebug_oob(void)
{
	return table[oob_index]; /* the bug */
}

static noinline int kbdebug_poke(const char *word, size_t len)
{
	pr_info("poke %.*s (%zu bytes)\n", (int)len, word, len);
	return (int)len;
}

static noinline void kbdebug_warn(size_t len)
{
	WARN_ON(len != 0); /* the bug */
}

static noinline ssize_t kbdebug_write(struct file *file, const char __user *ubuf, size_t count, loff_t *ppos)
{
	char word[16] = {};
	size_t n = min(count, sizeof(word) - 1);

	if (copy_from_user(word, ubuf, n))
		return -EFAULT;
	strim(word);
	if (!strcmp(word, "uaf"))
		kbdebug_uaf();
	else if (!strcmp(word, "kfence"))
		kbdebug_kfence();
	else if (!strcmp(word, "ab"))
		kbdebug_lock_ab();
	else if (!strcmp(word, "ba"))
		kbdebug_lock_ba();
	else if (!strcmp(word, "gfp"))
		kbdebug_gfp_atomic();
	else if (!strcmp(word, "sleep"))
		kbdebug_sleep_atomic();
	else if (!strcmp(word, "oob"))
		pr_info("oob read %d\n", kbdebug_oob());
	else if (!strcmp(word, "hello"))
		kbdebug_poke(word, strlen(word));
	else if (!strcmp(word, "warn"))
		kbdebug_warn(strlen(word));
	else
		return -EINVAL;
	return count;
}

static const struct file_operations trigger_fops = {
	.owner = THIS_MODULE,
	.write = kbdebug_write,
};

static int __init kbdebug_init(void)
{
	if (!strcmp(init_bug, "uaf"))
		kbdebug_uaf();
	dir = debugfs_create_dir("kbdebug", NULL);
	debugfs_create_file("trigger", 0200, dir, NULL, &trigger_fops);
	pr_info("loaded: write uaf|kfence|ab|ba|gfp|sleep|oob|hello|warn to /sys/kernel/debug/kbdebug/trigger\n");
	return 0;
}

static void __exit kbdebug_exit(void)
{
	debugfs_remove_recursive(dir);
}

module_init(kbdebug_init);
module_exit(kbdebug_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kbridge debug-kernel sanitizer triggers");
