// SPDX-License-Identifier: GPL-2.0
/*
 * kbchardev-client: exercises /dev/kbchardev from user space.
 *
 *   kbchardev-client write TEXT   write TEXT, print the count write() returned
 *   kbchardev-client read         print what the device holds
 *   kbchardev-client len          print the stored length (KBCHARDEV_GET_LEN)
 *   kbchardev-client clear        forget it (KBCHARDEV_CLEAR)
 *   kbchardev-client fill N       write N bytes of 'x' (over 64 fails with ENOSPC)
 *
 * Build it static so it runs in any guest: gcc -static -O2 -o kbchardev-client client.c
 * (arm64: aarch64-linux-gnu-gcc-12 -static ...). Exit status 0 on success, 1 on a failed call.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kbchardev.h"

#define DEVICE "/dev/kbchardev"

static int fail(const char *what)
{
	printf("%s: %s (errno %d)\n", what, strerror(errno), errno);
	return 1;
}

static int do_write(int fd, const char *buf, size_t len)
{
	ssize_t n = write(fd, buf, len);

	if (n < 0)
		return fail("write");
	printf("wrote %zd\n", n);
	return 0;
}

int main(int argc, char **argv)
{
	char buf[256];
	uint32_t len;
	ssize_t n;
	int fd;

	if (argc < 2) {
		fprintf(stderr, "usage: %s write TEXT | read | len | clear | fill N\n", argv[0]);
		return 2;
	}
	fd = open(DEVICE, O_RDWR);
	if (fd < 0)
		return fail("open " DEVICE);
	if (!strcmp(argv[1], "write") && argc == 3)
		return do_write(fd, argv[2], strlen(argv[2]));
	if (!strcmp(argv[1], "fill") && argc == 3) {
		size_t want = strtoul(argv[2], NULL, 0);
		char *big = malloc(want ? want : 1);

		if (!big)
			return fail("malloc");
		memset(big, 'x', want);
		return do_write(fd, big, want);
	}
	if (!strcmp(argv[1], "read")) {
		n = read(fd, buf, sizeof(buf) - 1);
		if (n < 0)
			return fail("read");
		buf[n] = '\0';
		printf("read %zd: %s\n", n, buf);
		return 0;
	}
	if (!strcmp(argv[1], "len")) {
		if (ioctl(fd, KBCHARDEV_GET_LEN, &len) < 0)
			return fail("ioctl KBCHARDEV_GET_LEN");
		printf("len %u\n", len);
		return 0;
	}
	if (!strcmp(argv[1], "clear")) {
		if (ioctl(fd, KBCHARDEV_CLEAR) < 0)
			return fail("ioctl KBCHARDEV_CLEAR");
		printf("cleared\n");
		return 0;
	}
	fprintf(stderr, "unknown command %s\n", argv[1]);
	return 2;
}
