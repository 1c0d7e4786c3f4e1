// SPDX-License-Identifier: GPL-2.0-only
/* An init that takes 20 s: a load with a shorter timeout must end in a known state. */
#include <linux/delay.h>
#include <linux/module.h>

static int __init slow_init_init(void)
{
	msleep(20000);
	return 0;
}

static void __exit slow_init_exit(void)
{
}

module_init(slow_init_init);
module_exit(slow_init_exit);
MODULE_LICENSE("GPL");
