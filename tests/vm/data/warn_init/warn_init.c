// SPDX-License-Identifier: GPL-2.0
/* warn_init: a module whose init hits a WARN_ON and carries on, to test that it still loads. */
#include <linux/module.h>

static int __init warn_init_init(void)
{
	WARN_ON(1);
	pr_info("warn_init: loaded after a warning\n");
	return 0;
}

static void __exit warn_init_exit(void)
{
}

module_init(warn_init_init);
module_exit(warn_init_exit);
MODULE_LICENSE("GPL");
