// SPDX-License-Identifier: GPL-2.0
/* oops_init: a module whose init dereferences NULL, to test how a crash in init is reported. */
#include <linux/module.h>

static int *nowhere;

static int __init oops_init_init(void)
{
	pr_info("about to oops\n");
	WRITE_ONCE(*nowhere, 1);
	return 0;
}

static void __exit oops_init_exit(void)
{
}

module_init(oops_init_init);
module_exit(oops_init_exit);
MODULE_LICENSE("GPL");
