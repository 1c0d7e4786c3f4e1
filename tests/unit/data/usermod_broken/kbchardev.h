/* SPDX-License-Identifier: GPL-2.0 */
/* The ioctls of /dev/kbchardev, shared by the driver and its user-space client. */
#ifndef KBCHARDEV_H
#define KBCHARDEV_H

#ifdef __KERNEL__
#include <linux/ioctl.h>
#include <linux/types.h>
#else
#include <stdint.h>
#include <sys/ioctl.h>
typedef uint32_t u32;
#endif

#define KBCHARDEV_MAGIC 'k'
#define KBCHARDEV_GET_LEN _IOR(KBCHARDEV_MAGIC, 1, u32)	/* bytes stored now */
#define KBCHARDEV_CLEAR _IO(KBCHARDEV_MAGIC, 2)		/* forget them */

#endif
