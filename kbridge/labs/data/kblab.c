// SPDX-License-Identifier: GPL-2.0-only
/*
 * kblab: the labs' workload, with exactly known system calls (no libc, so no
 * hidden ones). Its comm is "kblab", which the lab modules and filters select.
 *
 *   kblab write N     N write(2) calls to /dev/null of 1, 2, ... N bytes
 *                     (return values 1..N, sum N*(N+1)/2)
 *   kblab block K     K children block in write(2) on a full pipe at the same
 *                     time, then the parent drains it (1 + K writes:
 *                     one of 4096 bytes, K of 1 byte)
 *   kblab loop S      write(2) of 1 byte to /dev/null for S seconds (load)
 *
 * Built by kbridge on the host with -nostdlib for each guest arch.
 */

#if defined(__x86_64__)
#define NR_READ 0
#define NR_WRITE 1
#define NR_CLOSE 3
#define NR_PIPE2 293
#define NR_OPENAT 257
#define NR_NANOSLEEP 35
#define NR_CLONE 56
#define NR_WAIT4 61
#define NR_FCNTL 72
#define NR_EXIT_GROUP 231
#define NR_CLOCK_GETTIME 228

static long sc(long n, long a, long b, long c, long d, long e)
{
	long r;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;

	__asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
			 : "rcx", "r11", "memory");
	return r;
}

__asm__(".globl _start\n_start:\n\tmov %rsp, %rdi\n\tand $-16, %rsp\n\tcall start_c\n\thlt\n");
#elif defined(__aarch64__)
#define NR_READ 63
#define NR_WRITE 64
#define NR_CLOSE 57
#define NR_PIPE2 59
#define NR_OPENAT 56
#define NR_NANOSLEEP 101
#define NR_CLONE 220
#define NR_WAIT4 260
#define NR_FCNTL 25
#define NR_EXIT_GROUP 94
#define NR_CLOCK_GETTIME 113

static long sc(long n, long a, long b, long c, long d, long e)
{
	register long x8 __asm__("x8") = n;
	register long x0 __asm__("x0") = a;
	register long x1 __asm__("x1") = b;
	register long x2 __asm__("x2") = c;
	register long x3 __asm__("x3") = d;
	register long x4 __asm__("x4") = e;

	__asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4) : "memory");
	return x0;
}

__asm__(".globl _start\n_start:\n\tmov x0, sp\n\tbl start_c\n\tb .\n");
#elif defined(__arm__)
/* 32-bit arm, EABI (arch/arm/tools/syscall.tbl); nanosleep and clock_gettime take the
 * 32-bit struct timespec, which struct ts is with a 4-byte long. */
#define NR_READ 3
#define NR_WRITE 4
#define NR_CLOSE 6
#define NR_PIPE2 359
#define NR_OPENAT 322
#define NR_NANOSLEEP 162
#define NR_CLONE 120
#define NR_WAIT4 114
#define NR_FCNTL 55
#define NR_EXIT_GROUP 248
#define NR_CLOCK_GETTIME 263

static long sc(long n, long a, long b, long c, long d, long e)
{
	register long r7 __asm__("r7") = n;
	register long r0 __asm__("r0") = a;
	register long r1 __asm__("r1") = b;
	register long r2 __asm__("r2") = c;
	register long r3 __asm__("r3") = d;
	register long r4 __asm__("r4") = e;

	__asm__ volatile("svc 0" : "+r"(r0) : "r"(r7), "r"(r1), "r"(r2), "r"(r3), "r"(r4) : "memory");
	return r0;
}

__asm__(".globl _start\n_start:\n\tmov r0, sp\n\tbl start_c\n\tb .\n");
#else
#error "kblab: x86_64, aarch64 or arm only"
#endif

#define AT_FDCWD -100
#define O_WRONLY 1
#define O_RDONLY 0
#define O_NONBLOCK 04000
#define F_SETPIPE_SZ 1031
#define SIGCHLD 17
#define CLOCK_MONOTONIC 1

struct ts { long sec, nsec; };

static char buf[65536];
/* Initialised data, so the writable segment has file contents: a bss-only PT_LOAD (file size 0)
 * is mishandled by older binfmt_elf (5.10 arm64 segfaults at exec). */
static volatile int initialised = 1;

static void die(long code) { sc(NR_EXIT_GROUP, code, 0, 0, 0, 0); for (;;) ; }

static long num(const char *s)
{
	long n = 0;

	if (!s || !*s)
		die(2);
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			die(2);
		n = n * 10 + (*s - '0');
	}
	return n;
}

static int eq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

static void sleep_ms(long ms)
{
	struct ts t = { ms / 1000, (ms % 1000) * 1000000L };

	sc(NR_NANOSLEEP, (long)&t, 0, 0, 0, 0);
}

static long now_s(void)
{
	struct ts t;

	sc(NR_CLOCK_GETTIME, CLOCK_MONOTONIC, (long)&t, 0, 0, 0);
	return t.sec;
}

static void do_write(long n)
{
	long fd = sc(NR_OPENAT, AT_FDCWD, (long)"/dev/null", O_WRONLY, 0, 0);
	long i;

	if (fd < 0 || n > (long)sizeof(buf))
		die(1);
	for (i = 1; i <= n; i++)
		if (sc(NR_WRITE, fd, (long)buf, i, 0, 0) != i)
			die(1);
}

static void do_block(long k)
{
	int p[2];
	long i, child, status;

	if (sc(NR_PIPE2, (long)p, 0, 0, 0, 0) < 0 || sc(NR_FCNTL, p[1], F_SETPIPE_SZ, 4096, 0, 0) < 0)
		die(1);
	if (sc(NR_WRITE, p[1], (long)buf, 4096, 0, 0) != 4096)	/* the pipe is now full */
		die(1);
	for (i = 0; i < k; i++) {
		child = sc(NR_CLONE, SIGCHLD, 0, 0, 0, 0);
		if (child == 0) {
			sc(NR_WRITE, p[1], (long)buf, 1, 0, 0);	/* blocks until the parent reads */
			die(0);
		}
		if (child < 0)
			die(1);
	}
	sleep_ms(1000);		/* every child is now asleep inside write() */
	while (k > 0) {
		long got = sc(NR_READ, p[0], (long)buf, sizeof(buf), 0, 0);

		if (got <= 0)
			die(1);
		while (sc(NR_WAIT4, -1, (long)&status, 1 /* WNOHANG */, 0, 0) > 0)
			k--;
		if (k > 0)
			sleep_ms(50);
	}
}

static void do_loop(long secs)
{
	long fd = sc(NR_OPENAT, AT_FDCWD, (long)"/dev/null", O_WRONLY, 0, 0);
	long end = now_s() + secs;

	while (now_s() < end)
		sc(NR_WRITE, fd, (long)buf, 1, 0, 0);
}

void start_c(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);

	if (argc != 3 || !initialised)
		die(2);
	if (eq(argv[1], "write"))
		do_write(num(argv[2]));
	else if (eq(argv[1], "block"))
		do_block(num(argv[2]));
	else if (eq(argv[1], "loop"))
		do_loop(num(argv[2]));
	else
		die(2);
	die(0);
}
