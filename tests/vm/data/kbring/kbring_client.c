// SPDX-License-Identifier: GPL-2.0
/* kbring_client ping|oops: one ioctl on /dev/kbring (built static for the guest's arch). */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>

#define KBRING_PING _IO('k', 1)
#define KBRING_OOPS _IO('k', 2)

int main(int argc, char **argv)
{
	int fd = open("/dev/kbring", O_RDWR);

	if (fd < 0 || argc != 2) {
		perror("kbring_client: /dev/kbring");
		return 1;
	}
	return ioctl(fd, strcmp(argv[1], "oops") == 0 ? KBRING_OOPS : KBRING_PING) == 0 ? 0 : 1;
}
