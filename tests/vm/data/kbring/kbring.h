/* SPDX-License-Identifier: GPL-2.0 */
#ifndef KBRING_H
#define KBRING_H
#include <linux/ioctl.h>

#define KBRING_PING _IO('k', 1)		/* returns 0 */
#define KBRING_OOPS _IO('k', 2)		/* dereferences NULL: the bug under test */
#endif
