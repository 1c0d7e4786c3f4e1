// SPDX-License-Identifier: GPL-2.0-only
/*
 * kbcheck_detach: the kprobe-module checker's ablation of a student's post handler.
 *
 * Loaded with addr=<the student's probe address> owner=<the student's module> comm=<the
 * workload's comm>, it registers a kprobe of its own at that address. The kernel then keeps
 * every kprobe there on one aggregate kprobe's list (kernel/kprobes.c register_aggr_kprobe,
 * the same in 5.10, 6.1 and 6.12), and calls each one's post handler from aggr_post_handler.
 * Init finds on that list the kprobes whose handlers are functions of OWNER and swaps each
 * one's post handler for a no-op of this module; exit puts them back. While it is loaded the
 * student's pre handler runs at every hit and the post handler at none: a post count that
 * still moves was not counted by the post handler.
 *
 * A no-op, not NULL: aggr_post_handler reads kp->post_handler twice, to test it and to call it
 * (5.10 to 6.12, with plain loads: the compiler may well load it again), so a NULL written in
 * between would be called by another CPU's write(). Exit restores the handlers, then
 * unregister_kprobe() waits for an RCU grace period: no CPU is left in the no-op when this
 * module's text is freed. A kprobe of OWNER that left the list meanwhile (OWNER unloaded first)
 * is not written to.
 *
 * What it did, in /sys/kernel/debug/kbcheck_detach/state:
 *   addr ADDR             where its own kprobe landed
 *   hits N                its own kprobe's hits by tasks named COMM
 *   owned N               kprobes of OWNER at ADDR
 *   detached N            of them, the ones whose post handler it swapped out
 *   undetached N          those it had no room for (then nothing is proven)
 *   others N              other kprobes at ADDR
 *   kprobeI pre=F post=G  OWNER's kprobe I: its handlers' names (none: not attached)
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/atomic.h>
#include <linux/debugfs.h>
#include <linux/kallsyms.h>
#include <linux/kernel.h>
#include <linux/kprobes.h>
#include <linux/module.h>
#include <linux/rculist.h>
#include <linux/sched.h>
#include <linux/seq_file.h>
#include <linux/string.h>

#define MAX_OWNED 16

static unsigned long addr;
module_param(addr, ulong, 0444);
MODULE_PARM_DESC(addr, "the probe address (kprobes/list)");
static char owner[MODULE_NAME_LEN];
module_param_string(owner, owner, sizeof(owner), 0444);
MODULE_PARM_DESC(owner, "the module whose kprobes lose their post handler");
static char comm[TASK_COMM_LEN] = "kblab";
module_param_string(comm, comm, sizeof(comm), 0444);
MODULE_PARM_DESC(comm, "count hits of tasks with this comm");

static atomic_t hits;
static int nowned, nothers, nundetached;

static struct {
	struct kprobe *p;
	kprobe_post_handler_t post;
	char pre_name[KSYM_NAME_LEN];
	char post_name[KSYM_NAME_LEN];
} owned[MAX_OWNED];
static int ndetached;

static int count_hit(struct kprobe *p, struct pt_regs *regs)
{
	if (strncmp(current->comm, comm, TASK_COMM_LEN) == 0)
		atomic_inc(&hits);
	return 0;
}

static void post_noop(struct kprobe *p, struct pt_regs *regs, unsigned long flags)
{
}

static struct kprobe kp = {
	.pre_handler = count_hit,
};

/*
 * FN's name into NAME ("none" for NULL); whether it is a function of OWNER.
 * sprint_symbol_no_offset() writes "handler_post [kprobe_lab]" for a module's function and
 * "aggr_pre_handler" for the kernel's own (5.10 to 6.12: no build id without an offset).
 */
static bool owned_fn(void *fn, char *name, size_t size)
{
	static char buf[KSYM_SYMBOL_LEN];
	char *mod;
	size_t len = strlen(owner);

	if (!fn) {
		strscpy(name, "none", size);
		return false;
	}
	sprint_symbol_no_offset(buf, (unsigned long)fn);
	mod = strstr(buf, " [");
	if (mod)
		*mod = '\0';
	strscpy(name, buf, size);
	if (!mod)
		return false;
	mod += 2;
	return len && strncmp(mod, owner, len) == 0 && (mod[len] == ']' || mod[len] == ' ');
}

static bool is_aggregate(struct kprobe *p)
{
	static char name[KSYM_NAME_LEN];

	owned_fn(p->pre_handler, name, sizeof(name));
	return strcmp(name, "aggr_pre_handler") == 0;
}

/* Whether P is still on the list our own kprobe is on (it was unregistered otherwise). */
static bool listed(struct kprobe *p)
{
	struct list_head *pos;
	bool found = false;

	rcu_read_lock();
	for (pos = READ_ONCE(kp.list.next); pos != &kp.list; pos = READ_ONCE(pos->next)) {
		if (list_entry(pos, struct kprobe, list) == p) {
			found = true;
			break;
		}
	}
	rcu_read_unlock();
	return found;
}

static void detach_owned(void)
{
	static char pre[KSYM_NAME_LEN], post[KSYM_NAME_LEN];
	struct list_head *pos;

	/*
	 * The list is a ring through the aggregate's head: walked from our own entry, it visits
	 * the head (aggr_pre_handler) and every other kprobe at ADDR. A kprobe registered alone
	 * has an empty list: then there is no other kprobe at ADDR.
	 */
	rcu_read_lock();
	for (pos = READ_ONCE(kp.list.next); pos != &kp.list; pos = READ_ONCE(pos->next)) {
		struct kprobe *p = list_entry(pos, struct kprobe, list);
		bool mine;

		if (is_aggregate(p))
			continue;
		mine = owned_fn(p->pre_handler, pre, sizeof(pre));
		mine |= owned_fn(p->post_handler, post, sizeof(post));
		if (!mine) {
			nothers++;
			continue;
		}
		if (nowned == MAX_OWNED) {
			nundetached++;
			continue;
		}
		owned[nowned].p = p;
		strscpy(owned[nowned].pre_name, pre, KSYM_NAME_LEN);
		strscpy(owned[nowned].post_name, post, KSYM_NAME_LEN);
		if (p->post_handler) {
			owned[nowned].post = p->post_handler;
			WRITE_ONCE(p->post_handler, post_noop);
			ndetached++;
		}
		nowned++;
	}
	rcu_read_unlock();
}

static void reattach_owned(void)
{
	int i;

	for (i = 0; i < nowned; i++) {
		struct kprobe *p = owned[i].p;

		if (owned[i].post && listed(p) && READ_ONCE(p->post_handler) == post_noop)
			WRITE_ONCE(p->post_handler, owned[i].post);
	}
}

static int state_show(struct seq_file *m, void *v)
{
	int i;

	seq_printf(m, "addr %lx\nhits %d\nowned %d\ndetached %d\nundetached %d\nothers %d\n",
		   (unsigned long)kp.addr, atomic_read(&hits), nowned + nundetached, ndetached,
		   nundetached, nothers);
	for (i = 0; i < nowned; i++)
		seq_printf(m, "kprobe%d pre=%s post=%s\n", i, owned[i].pre_name, owned[i].post_name);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(state);

static struct dentry *dir;

static int __init kbcheck_detach_init(void)
{
	int ret;

	if (!addr || !owner[0])
		return -EINVAL;
	kp.addr = (kprobe_opcode_t *)addr;
	ret = register_kprobe(&kp);
	if (ret < 0) {
		pr_err("register_kprobe at %px failed, returned %d\n", (void *)addr, ret);
		return ret;
	}
	detach_owned();
	dir = debugfs_create_dir(KBUILD_MODNAME, NULL);
	debugfs_create_file("state", 0444, dir, NULL, &state_fops);
	return 0;
}

static void __exit kbcheck_detach_exit(void)
{
	debugfs_remove_recursive(dir);
	reattach_owned();
	/* Waits for an RCU grace period: a CPU that read post_noop before reattach_owned() is out of it. */
	unregister_kprobe(&kp);
}

module_init(kbcheck_detach_init);
module_exit(kbcheck_detach_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kbridge lab checker: a student's kprobe post handlers detached while loaded");
