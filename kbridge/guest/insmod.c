// SPDX-License-Identifier: GPL-2.0-only
/*
 * kbridge-insmod FILE [PARAMS]: finit_module(2), once; exit status = errno (0: loaded).
 *
 * busybox insmod retries with init_module(2) whenever finit_module(2) fails, so a
 * module whose init fails would run its init twice (measured: busybox 1.35 on 6.1).
 * This calls finit_module once and exits with its errno. It uses no libc, so the
 * host's gcc (or its cross build) builds it for every guest arch; the syscall glue
 * below is the only per-arch code, as in the kernel's tools/include/nolibc.
 */
#if defined(__x86_64__)
#define NR_OPENAT 257
#define NR_FINIT_MODULE 313
#define NR_EXIT_GROUP 231
__asm__(".globl _start\n_start:\n\tmov %rsp, %rdi\n\tand $-16, %rsp\n\tcall cmain\n\thlt\n");
static long sys3(long n, long a, long b, long c)
{
	long r;

	__asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
	return r;
}
#elif defined(__aarch64__)
#define NR_OPENAT 56
#define NR_FINIT_MODULE 273
#define NR_EXIT_GROUP 94
__asm__(".globl _start\n_start:\n\tmov x0, sp\n\tbl cmain\n");
static long sys3(long n, long a, long b, long c)
{
	register long x8 __asm__("x8") = n;
	register long x0 __asm__("x0") = a;
	register long x1 __asm__("x1") = b;
	register long x2 __asm__("x2") = c;

	__asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2) : "memory");
	return x0;
}
#elif defined(__arm__)
/* EABI: the number in r7 (arch/arm/tools/syscall.tbl), arguments in r0-r2. */
#define NR_OPENAT 322
#define NR_FINIT_MODULE 379
#define NR_EXIT_GROUP 248
__asm__(".globl _start\n_start:\n\tmov r0, sp\n\tbl cmain\n");
static long sys3(long n, long a, long b, long c)
{
	register long r7 __asm__("r7") = n;
	register long r0 __asm__("r0") = a;
	register long r1 __asm__("r1") = b;
	register long r2 __asm__("r2") = c;

	__asm__ volatile("svc 0" : "+r"(r0) : "r"(r7), "r"(r1), "r"(r2) : "memory");
	return r0;
}
#endif

void cmain(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	long fd, ret = 22;

	if (argc == 2 || argc == 3) {
		fd = sys3(NR_OPENAT, -100, (long)argv[1], 02000000);
		ret = fd < 0 ? 250 : -sys3(NR_FINIT_MODULE, fd, (long)(argc == 3 ? argv[2] : ""), 0);
	}
	sys3(NR_EXIT_GROUP, ret, 0, 0);
	for (;;)
		;
}
