// SPDX-License-Identifier: GPL-2.0-only
/*
 * kbridge-agent: kbridge's helper on a machine it reaches over SSH (a Vagrant machine), run as
 * root through sudo on one channel of kbridge's SSH connection. Like qemu-guest-agent in the
 * embedded VM, it does file operations itself and starts commands as its children, so a probe
 * that excludes its tgid (and its parents: sudo, sshd) counts the workload and nothing of
 * kbridge's own plumbing.
 *
 *   agent serve DIR LOCK
 *                     requests on stdin, replies on stdout (below); its files in DIR, removed
 *                     when it ends. Holds the machine's lock (flock on LOCK, kbridge gives
 *                     /run/kbridge/vagrant.lock) for its whole life: one kbridge at a time.
 *   agent copy FILE   FILE (/dev/kmsg) to stdout as it grows.
 *   agent hold LINK   LINK -> this process's stdout (the SSH channel): a program that writes
 *                     to LINK writes straight to the channel, with no relay process between.
 *
 * Every mode first prints "pid=P parents=P1,P2,..." (itself and its ancestors up to, not
 * including, the daemon that accepted the SSH connection) and ends when its stdin ends, which
 * is when kbridge closes the channel or dies: nothing it started to serve kbridge outlives it.
 *
 * Requests and replies are a 24-byte header and a payload (little-endian on both arches):
 *   request  u32 op, u32 nstr, u32 strbytes, u32 0, u64 datalen; nstr NUL-terminated strings
 *            (strbytes bytes), then datalen bytes of data
 *   reply    u32 kind, i32 code, u64 len1, u64 len2; then len1 + len2 bytes
 *
 * It uses no libc: the host's gcc (or its cross build) builds it for every guest arch; the
 * syscall glue is the only per-arch code, as in the kernel's tools/include/nolibc.
 */

#define O_RDONLY 00
#define O_WRONLY 01
#define O_RDWR 02
#define O_CREAT 0100
#define O_TRUNC 01000
#define O_APPEND 02000
#define O_NONBLOCK 04000
#define O_CLOEXEC 02000000
#define AT_FDCWD (-100)
#define AT_REMOVEDIR 0x200
#define POLLIN 0x1
#define POLLHUP 0x10
#define WNOHANG 1
#define SIGKILL 9
#define SIGCHLD 17
#define LOCK_EX 2
#define LOCK_NB 4
#define EINTR 4
#define EAGAIN 11
#define EEXIST 17
#define EPIPE 32
#define ENOENT 2
#define ENOSYS 38

#if defined(__x86_64__)
#define NR_read 0
#define NR_write 1
#define NR_close 3
#define NR_lseek 8
#define NR_pread64 17
#define NR_getpid 39
#define NR_clone 56
#define NR_execve 59
#define NR_wait4 61
#define NR_kill 62
#define NR_flock 73
#define NR_setpgid 109
#define NR_getdents64 217
#define NR_exit_group 231
#define NR_openat 257
#define NR_mkdirat 258
#define NR_unlinkat 263
#define NR_symlinkat 266
#define NR_ppoll 271
#define NR_dup3 292
#define NR_pidfd_open 434
#define NR_clock_gettime 228
__asm__(".globl _start\n_start:\n\tmov %rsp, %rdi\n\tand $-16, %rsp\n\tcall cmain\n\thlt\n");
static long sc6(long n, long a, long b, long c, long d, long e, long f)
{
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	register long r9 __asm__("r9") = f;
	long r;

	__asm__ volatile("syscall"
			 : "=a"(r)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return r;
}
#elif defined(__aarch64__)
#define NR_getdents64 61
#define NR_read 63
#define NR_write 64
#define NR_close 57
#define NR_lseek 62
#define NR_pread64 67
#define NR_getpid 172
#define NR_clone 220
#define NR_execve 221
#define NR_wait4 260
#define NR_kill 129
#define NR_flock 32
#define NR_setpgid 154
#define NR_exit_group 94
#define NR_openat 56
#define NR_mkdirat 34
#define NR_unlinkat 35
#define NR_symlinkat 36
#define NR_ppoll 73
#define NR_dup3 24
#define NR_pidfd_open 434
#define NR_clock_gettime 113
__asm__(".globl _start\n_start:\n\tmov x0, sp\n\tbl cmain\n");
static long sc6(long n, long a, long b, long c, long d, long e, long f)
{
	register long x8 __asm__("x8") = n;
	register long x0 __asm__("x0") = a;
	register long x1 __asm__("x1") = b;
	register long x2 __asm__("x2") = c;
	register long x3 __asm__("x3") = d;
	register long x4 __asm__("x4") = e;
	register long x5 __asm__("x5") = f;

	__asm__ volatile("svc 0"
			 : "+r"(x0)
			 : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4), "r"(x5)
			 : "memory");
	return x0;
}
#else
#error "kbridge-agent: x86_64 and aarch64 only"
#endif

#define sc3(n, a, b, c) sc6(n, (long)(a), (long)(b), (long)(c), 0, 0, 0)
#define sc4(n, a, b, c, d) sc6(n, (long)(a), (long)(b), (long)(c), (long)(d), 0, 0)

/* gcc may emit calls to these even in freestanding code (struct copies, zeroing). */
void *memset(void *d, int c, unsigned long n)
{
	unsigned char *p = d;

	while (n--)
		*p++ = (unsigned char)c;
	return d;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
	unsigned char *p = d;
	const unsigned char *q = s;

	while (n--)
		*p++ = *q++;
	return d;
}

struct pollfd {
	int fd;
	short events, revents;
};

struct timespec {
	long sec, nsec;
};

struct req {
	unsigned int op, nstr, strbytes, pad;
	unsigned long long datalen;
};

struct rep {
	unsigned int kind;
	int code;
	unsigned long long len1, len2;
};

enum { OP_RUN = 1, OP_SPAWN, OP_STATUS, OP_WRITE, OP_READ, OP_KILL, OP_CANCEL };
enum { R_READY = 1, R_BUSY, R_RESULT, R_RUNNING, R_PID, R_DONE, R_CHUNK, R_END, R_ERROR };

#define MAXSTR (256 * 1024)
#define MAXARGS 4096
#define BUFSZ (1 << 20)

static char strs[MAXSTR];
static char *args[MAXARGS + 1];
static char buf[BUFSZ];
static char line[4096];
static char stat[1024];
static char **envp;
static int dirfd = -1;

static __attribute__((noreturn)) void die(int code)
{
	for (;;)
		sc3(NR_exit_group, code, 0, 0);
}

static unsigned long slen(const char *s);
static char *put_str(char *p, const char *s);
static char *put_long(char *p, long v);
static long write_all(int fd, const void *data, unsigned long n);

/* "kbridge-agent: WHAT PATH: errno N" on stderr (the host shows it), then exit 2. */
static __attribute__((noreturn)) void fail(const char *what, const char *path, long err)
{
	static char msg[512];
	char *p = put_str(msg, "kbridge-agent: ");

	p = put_str(p, what);
	*p++ = ' ';
	p = put_str(p, slen(path) < 400 ? path : "(a long path)");
	p = put_str(p, ": errno ");
	p = put_long(p, -err);
	*p++ = '\n';
	write_all(2, msg, (unsigned long)(p - msg));
	die(2);
}

static unsigned long slen(const char *s)
{
	unsigned long n = 0;

	while (s[n])
		n++;
	return n;
}

static int seq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

static long to_long(const char *s)
{
	long v = 0, neg = 0;

	if (*s == '-')
		neg = 1, s++;
	while (*s >= '0' && *s <= '9')
		v = v * 10 + (*s++ - '0');
	return neg ? -v : v;
}

/* Append decimal V to P; returns the new end. */
static char *put_long(char *p, long v)
{
	char tmp[24];
	int n = 0;

	if (v < 0) {
		*p++ = '-';
		v = -v;
	}
	do
		tmp[n++] = (char)('0' + v % 10);
	while (v /= 10);
	while (n)
		*p++ = tmp[--n];
	return p;
}

static char *put_str(char *p, const char *s)
{
	while (*s)
		*p++ = *s++;
	return p;
}

/* Write all of N bytes; 0 or -errno. */
static long write_all(int fd, const void *data, unsigned long n)
{
	const char *p = data;

	while (n) {
		long w = sc3(NR_write, fd, p, n);

		if (w == -EINTR)
			continue;
		if (w <= 0)
			return w ? w : -EPIPE;
		p += w;
		n -= (unsigned long)w;
	}
	return 0;
}

/* Read exactly N bytes; N, 0 at end of input, or -errno. */
static long read_exact(int fd, void *data, unsigned long n)
{
	char *p = data;
	unsigned long got = 0;

	while (got < n) {
		long r = sc3(NR_read, fd, p + got, n - got);

		if (r == -EINTR)
			continue;
		if (r <= 0)
			return r;
		got += (unsigned long)r;
	}
	return (long)got;
}

static void reply(unsigned int kind, int code, unsigned long long len1, unsigned long long len2)
{
	struct rep r = { kind, code, len1, len2 };

	if (write_all(1, &r, sizeof(r)))
		die(0); /* kbridge went away */
}

/* Send the first N bytes of FD (rewound) as payload. */
static void send_file(int fd, unsigned long long n)
{
	sc3(NR_lseek, fd, 0, 0);
	while (n) {
		long r = sc3(NR_read, fd, buf, n < BUFSZ ? n : BUFSZ);

		if (r <= 0) { /* shrank meanwhile: pad, the header promised N */
			memset(buf, 0, BUFSZ);
			r = (long)(n < BUFSZ ? n : BUFSZ);
		}
		if (write_all(1, buf, (unsigned long)r))
			die(0);
		n -= (unsigned long)r;
	}
}

static long now_ms(void)
{
	struct timespec ts = { 0, 0 };

	sc3(NR_clock_gettime, 1 /* CLOCK_MONOTONIC */, &ts, 0);
	return ts.sec * 1000 + ts.nsec / 1000000;
}

static long file_size(int fd)
{
	return sc3(NR_lseek, fd, 0, 2 /* SEEK_END */);
}

/* Copy N bytes of stdin (a request's data) to FD; -errno of the first failed write (the rest is still read). */
static long stdin_to(int fd, unsigned long long n)
{
	long err = 0;

	while (n) {
		long r = sc3(NR_read, 0, buf, n < BUFSZ ? n : BUFSZ);

		if (r == -EINTR)
			continue;
		if (r <= 0)
			die(0);
		if (!err && fd >= 0)
			err = write_all(fd, buf, (unsigned long)r);
		n -= (unsigned long)r;
	}
	return err;
}

/* "pid=P parents=A,B,...\n": this process and its ancestors up to the one whose parent is init. */
static char *put_lineage(char *p)
{
	long pid = sc3(NR_getpid, 0, 0, 0), cur = pid;
	int first = 1, depth = 0;

	p = put_str(p, "pid=");
	p = put_long(p, pid);
	p = put_str(p, " parents=");
	while (cur > 1 && depth++ < 16) {
		char path[48], *q = put_str(path, "/proc/");
		long fd, n, ppid = 0, i;

		q = put_long(q, cur);
		put_str(q, "/stat")[0] = 0;
		fd = sc3(NR_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			break;
		n = sc3(NR_read, fd, stat, sizeof(stat) - 1);
		sc3(NR_close, fd, 0, 0);
		if (n <= 0)
			break;
		stat[n] = 0;
		for (i = n - 1; i > 0 && stat[i] != ')'; i--)
			;
		/* ") S PPID ..." after the last ')' (a comm may hold parentheses) */
		if (i + 4 < n)
			ppid = to_long(stat + i + 4);
		if (ppid <= 1)
			break; /* CUR is the daemon (sshd's listener): not kbridge's */
		if (cur != pid) {
			if (!first)
				*p++ = ',';
			p = put_long(p, cur);
			first = 0;
		}
		cur = ppid;
	}
	*p++ = '\n';
	return p;
}

/* Split the request's strings into args[]; their count, or -1. */
static long split(const struct req *rq)
{
	unsigned int i, n = 0;
	char *p = strs, *end = strs + rq->strbytes;

	if (rq->nstr > MAXARGS)
		return -1;
	for (i = 0; i < rq->nstr; i++) {
		args[n++] = p;
		while (p < end && *p)
			p++;
		if (p >= end)
			return -1;
		p++;
	}
	args[n] = 0;
	return n;
}

static const char *const path_dirs[] = { "/usr/local/sbin/", "/usr/local/bin/", "/usr/sbin/", "/usr/bin/",
					 "/sbin/", "/bin/", 0 };

/* In the child: stdin/out/err from the three files, then exec ARGV (searched like $PATH). */
static __attribute__((noreturn)) void child_exec(char **argv, long in, long out, long err, int own_group)
{
	long r = -ENOENT;
	char *p;
	int i;

	if (own_group)
		sc3(NR_setpgid, 0, 0, 0);
	sc3(NR_dup3, in, 0, 0);
	sc3(NR_dup3, out, 1, 0);
	sc3(NR_dup3, err, 2, 0);
	for (p = argv[0]; *p && *p != '/'; p++)
		;
	if (*p)
		r = sc3(NR_execve, argv[0], argv, envp);
	else
		for (i = 0; path_dirs[i]; i++) {
			char *q = put_str(buf, path_dirs[i]);

			if (slen(argv[0]) > 4000)
				break;
			put_str(q, argv[0])[0] = 0;
			r = sc3(NR_execve, buf, argv, envp);
			if (r != -ENOENT)
				break;
		}
	p = put_str(line, "kbridge-agent: cannot run ");
	p = put_str(p, slen(argv[0]) < 3000 ? argv[0] : "(a long name)");
	p = put_str(p, ": errno ");
	p = put_long(p, -r);
	*p++ = '\n';
	write_all(2, line, (unsigned long)(p - line));
	die(127);
}

static long spawn_child(char **argv, long in, long out, long err, int own_group)
{
	long pid = sc6(NR_clone, SIGCHLD, 0, 0, 0, 0, 0);

	if (pid == 0)
		child_exec(argv, in, out, err, own_group);
	return pid;
}

static long open_in_dir(const char *name, long flags)
{
	return sc4(NR_openat, dirfd, name, flags | O_CLOEXEC | O_CREAT, 0600);
}

/* Wait for child PID; with CANCEL_FD >= 0, a request on it cancels the command (and its end of
 * input kills it: kbridge is gone). TIMEOUT_MS < 0: no limit. Returns 1 and *ST when it exited. */
static int wait_child(long pid, int *st, long timeout_ms, int cancel_fd)
{
	long pidfd = sc3(NR_pidfd_open, pid, 0, 0); /* 5.3+; before it, a 10 ms poll */
	long deadline = timeout_ms >= 0 ? now_ms() + timeout_ms : -1;
	int done = 0;

	for (;;) {
		struct pollfd fds[2];
		struct timespec ts;
		long w = sc6(NR_wait4, pid, (long)st, WNOHANG, 0, 0, 0), left = -1;
		int n = 0;

		if (w == pid)
			done = 1;
		if (w == pid || w < 0)
			break;
		if (deadline >= 0) {
			left = deadline - now_ms();
			if (left <= 0)
				break;
		}
		if (pidfd < 0 && (left < 0 || left > 10))
			left = 10;
		if (pidfd >= 0) {
			fds[n].fd = (int)pidfd;
			fds[n].events = POLLIN;
			fds[n++].revents = 0;
		}
		if (cancel_fd >= 0) {
			fds[n].fd = cancel_fd;
			fds[n].events = POLLIN;
			fds[n++].revents = 0;
		}
		ts.sec = left / 1000;
		ts.nsec = (left % 1000) * 1000000;
		sc6(NR_ppoll, (long)fds, n, left >= 0 ? (long)&ts : 0, 0, 8, 0);
		if (cancel_fd >= 0 && (fds[n - 1].revents & (POLLIN | POLLHUP))) {
			struct req rq;

			if (read_exact(cancel_fd, &rq, sizeof(rq)) != sizeof(rq)) {
				sc3(NR_kill, -pid, SIGKILL, 0);
				sc3(NR_kill, pid, SIGKILL, 0);
				sc6(NR_wait4, pid, (long)st, 0, 0, 0, 0);
				die(0);
			}
			if (rq.op == OP_CANCEL) {
				sc3(NR_kill, -pid, SIGKILL, 0);
				sc3(NR_kill, pid, SIGKILL, 0);
			}
		}
	}
	if (pidfd >= 0)
		sc3(NR_close, pidfd, 0, 0);
	return done;
}

static void send_result(int st, long out, long err)
{
	long no = file_size(out), ne = file_size(err);

	reply(R_RESULT, st, (unsigned long long)no, (unsigned long long)ne);
	send_file((int)out, (unsigned long long)no);
	send_file((int)err, (unsigned long long)ne);
}

static void op_run(struct req *rq)
{
	long in = open_in_dir("in", O_RDWR | O_TRUNC), out = open_in_dir("out", O_RDWR | O_TRUNC);
	long err = open_in_dir("err", O_RDWR | O_TRUNC), pid;
	int st = 0;

	stdin_to((int)in, rq->datalen);
	sc3(NR_lseek, in, 0, 0);
	pid = in < 0 || out < 0 || err < 0 ? -EPIPE : spawn_child(args, in, out, err, 1);
	if (pid < 0) {
		reply(R_ERROR, (int)pid, 0, 0);
	} else {
		wait_child(pid, &st, -1, 0);
		send_result(st, out, err);
	}
	sc3(NR_close, in, 0, 0);
	sc3(NR_close, out, 0, 0);
	sc3(NR_close, err, 0, 0);
}

/* "<id>.<suffix>" into NAME. */
static void spawn_name(char *name, const char *id, const char *suffix)
{
	put_str(put_str(put_str(name, id), "."), suffix)[0] = 0;
}

static int valid_id(const char *id)
{
	unsigned long n = slen(id), i;

	if (n == 0 || n > 32)
		return 0;
	for (i = 0; i < n; i++)
		if (!((id[i] >= 'a' && id[i] <= 'z') || (id[i] >= '0' && id[i] <= '9') || id[i] == '-'))
			return 0;
	return 1;
}

static void op_spawn(struct req *rq, long n)
{
	char name[48];
	long in, out, err, pid;

	if (n < 2 || !valid_id(args[0])) {
		stdin_to(-1, rq->datalen);
		reply(R_ERROR, -22, 0, 0);
		return;
	}
	spawn_name(name, args[0], "in");
	in = open_in_dir(name, O_RDWR | O_TRUNC);
	sc3(NR_unlinkat, dirfd, name, 0); /* the child reads it through the open fd */
	stdin_to((int)in, rq->datalen);
	sc3(NR_lseek, in, 0, 0);
	spawn_name(name, args[0], "out");
	out = open_in_dir(name, O_WRONLY | O_TRUNC);
	spawn_name(name, args[0], "err");
	err = open_in_dir(name, O_WRONLY | O_TRUNC);
	/* Not a process group of its own: kbridge starts these through setsid, which then needs no fork. */
	pid = in < 0 || out < 0 || err < 0 ? -EPIPE : spawn_child(args + 1, in, out, err, 0);
	sc3(NR_close, in, 0, 0);
	sc3(NR_close, out, 0, 0);
	sc3(NR_close, err, 0, 0);
	reply(pid < 0 ? R_ERROR : R_PID, (int)pid, 0, 0);
}

static void op_status(long n)
{
	char name[48];
	long pid, wait_ms, out, err;
	int st = 0;

	if (n != 3 || !valid_id(args[1])) {
		reply(R_ERROR, -22, 0, 0);
		return;
	}
	pid = to_long(args[0]);
	wait_ms = to_long(args[2]);
	if (!wait_child(pid, &st, wait_ms, -1)) {
		long w = sc6(NR_wait4, pid, (long)&st, WNOHANG, 0, 0, 0);

		if (w != pid) {
			reply(w < 0 ? R_ERROR : R_RUNNING, (int)w, 0, 0);
			return;
		}
	}
	spawn_name(name, args[1], "out");
	out = sc3(NR_openat, dirfd, name, O_RDONLY | O_CLOEXEC);
	sc3(NR_unlinkat, dirfd, name, 0);
	spawn_name(name, args[1], "err");
	err = sc3(NR_openat, dirfd, name, O_RDONLY | O_CLOEXEC);
	sc3(NR_unlinkat, dirfd, name, 0);
	send_result(st, out, err);
	sc3(NR_close, out, 0, 0);
	sc3(NR_close, err, 0, 0);
}

/* One write(2) when the data fits the buffer: a tracefs file parses each write as a whole. */
static void op_write(struct req *rq, long n)
{
	long fd, r = 0;

	if (n != 2) {
		stdin_to(-1, rq->datalen);
		reply(R_ERROR, -22, 0, 0);
		return;
	}
	fd = sc4(NR_openat, AT_FDCWD, args[0], O_WRONLY | O_CREAT | O_CLOEXEC | (args[1][0] == 'a' ? O_APPEND : O_TRUNC),
		 0644);
	if (rq->datalen <= BUFSZ) {
		long got = read_exact(0, buf, rq->datalen);

		if (got != (long)rq->datalen)
			die(0);
		if (fd >= 0 && rq->datalen) {
			r = sc3(NR_write, fd, buf, rq->datalen);
			if (r >= 0 && (unsigned long long)r != rq->datalen)
				r = -EAGAIN; /* a short write: the file took part of it */
		}
	} else {
		r = stdin_to((int)fd, rq->datalen);
	}
	if (fd < 0)
		r = fd;
	else
		sc3(NR_close, fd, 0, 0);
	reply(R_DONE, r < 0 ? (int)r : 0, 0, 0);
}

/* The file in chunks, from OFFSET (pread) and at most MAXLEN bytes (< 0: to its end), then its errno. */
static void op_read(long n)
{
	long fd, off, left, r = 0;

	if (n != 3) {
		reply(R_ERROR, -22, 0, 0);
		return;
	}
	off = to_long(args[1]);
	left = to_long(args[2]);
	fd = sc3(NR_openat, AT_FDCWD, args[0], O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		reply(R_END, (int)fd, 0, 0);
		return;
	}
	while (left != 0) {
		unsigned long want = left > 0 && left < BUFSZ ? (unsigned long)left : BUFSZ;

		r = off ? sc6(NR_pread64, fd, (long)buf, (long)want, off, 0, 0) : sc3(NR_read, fd, buf, want);
		if (r == -EINTR)
			continue;
		if (r <= 0)
			break;
		reply(R_CHUNK, 0, (unsigned long long)r, 0);
		if (write_all(1, buf, (unsigned long)r))
			die(0);
		if (off)
			off += r;
		if (left > 0)
			left -= r;
		r = 0;
	}
	sc3(NR_close, fd, 0, 0);
	reply(R_END, r < 0 ? (int)r : 0, 0, 0);
}

static void op_kill(long n)
{
	if (n != 2) {
		reply(R_ERROR, -22, 0, 0);
		return;
	}
	reply(R_DONE, (int)sc3(NR_kill, to_long(args[0]), to_long(args[1]), 0), 0, 0);
}

/* Remove everything in DIR (kbridge's files of this connection) and DIR itself. */
static void clean_dir(const char *dir)
{
	int removed = 1;

	while (removed) {
		removed = 0;
		sc3(NR_lseek, dirfd, 0, 0);
		for (;;) {
			long n = sc3(NR_getdents64, dirfd, buf, BUFSZ), i = 0;

			if (n <= 0)
				break;
			while (i < n) {
				unsigned short reclen = *(unsigned short *)(buf + i + 16);
				char *name = buf + i + 19;

				if (!seq(name, ".") && !seq(name, "..") && sc3(NR_unlinkat, dirfd, name, 0) == 0)
					removed = 1;
				i += reclen;
			}
		}
	}
	sc3(NR_unlinkat, AT_FDCWD, dir, AT_REMOVEDIR);
}

/* The machine's lock, waiting while another kbridge holds it (said once); kbridge gone: exit. */
static void lock_machine(const char *path)
{
	long fd, said = 0;

	fd = sc4(NR_openat, AT_FDCWD, path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (fd < 0)
		return;
	for (;;) {
		struct pollfd p = { 0, POLLIN, 0 };
		struct timespec ts = { 0, 100 * 1000 * 1000 };
		long r = sc3(NR_flock, fd, LOCK_EX | LOCK_NB, 0);

		if (r != -EAGAIN)
			return; /* held (fd stays open for the agent's life), or flock unsupported */
		if (!said++)
			reply(R_BUSY, 0, 0, 0);
		if (sc6(NR_ppoll, (long)&p, 1, (long)&ts, 0, 8, 0) > 0)
			die(0); /* a request before READY, or the end of input: kbridge gave up */
	}
}

static void serve(const char *dir, const char *lock)
{
	char *p;

	dirfd = (int)sc3(NR_openat, AT_FDCWD, dir, O_RDONLY | O_CLOEXEC);
	if (dirfd < 0)
		fail("cannot open its directory", dir, dirfd);
	lock_machine(lock);
	p = put_lineage(line);
	reply(R_READY, (int)sc3(NR_getpid, 0, 0, 0), (unsigned long long)(p - line), 0);
	if (write_all(1, line, (unsigned long)(p - line)))
		die(0);
	for (;;) {
		struct req rq;
		long n;

		if (read_exact(0, &rq, sizeof(rq)) != sizeof(rq))
			break;
		if (rq.strbytes > MAXSTR || read_exact(0, strs, rq.strbytes) != rq.strbytes)
			break;
		n = split(&rq);
		if (n < 0)
			break;
		if (rq.op == OP_RUN && n > 0)
			op_run(&rq);
		else if (rq.op == OP_SPAWN)
			op_spawn(&rq, n);
		else if (rq.op == OP_STATUS)
			op_status(n);
		else if (rq.op == OP_WRITE)
			op_write(&rq, n);
		else if (rq.op == OP_READ)
			op_read(n);
		else if (rq.op == OP_KILL)
			op_kill(n);
		else if (rq.op == OP_CANCEL)
			stdin_to(-1, rq.datalen); /* the command it meant has ended already */
		else {
			stdin_to(-1, rq.datalen);
			reply(R_ERROR, -ENOSYS, 0, 0);
		}
	}
	clean_dir(dir);
	die(0);
}

/* Copy FILE to stdout as it grows (each read of /dev/kmsg is one record), until stdin ends. */
static void copy(const char *file)
{
	long fd = sc3(NR_openat, AT_FDCWD, file, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
	char *p;

	if (fd < 0)
		fail("cannot read", file, fd);
	p = put_lineage(line);
	if (write_all(1, line, (unsigned long)(p - line)))
		die(0);
	for (;;) {
		struct pollfd fds[2] = { { (int)fd, POLLIN, 0 }, { 0, POLLIN, 0 } };

		if (sc6(NR_ppoll, (long)fds, 2, 0, 0, 8, 0) < 0)
			continue;
		if (fds[1].revents & (POLLIN | POLLHUP))
			if (sc3(NR_read, 0, buf, 64) <= 0)
				die(0);
		if (fds[0].revents & POLLIN) {
			long r = sc3(NR_read, fd, buf, BUFSZ);

			/* -EPIPE: records were overwritten before this read; the next read goes on. */
			if (r > 0 && write_all(1, buf, (unsigned long)r))
				die(0);
			if (r == 0)
				die(0);
		}
	}
}

/* LINK -> /proc/PID/fd/1 (this process's stdout, the SSH channel) until stdin ends. */
static void hold(const char *link)
{
	char target[48], *p = put_str(target, "/proc/");
	long r;

	p = put_long(p, sc3(NR_getpid, 0, 0, 0));
	put_str(p, "/fd/1")[0] = 0;
	sc3(NR_unlinkat, AT_FDCWD, link, 0);
	r = sc3(NR_symlinkat, target, AT_FDCWD, link);
	if (r < 0)
		fail("cannot make the link", link, r);
	p = put_lineage(line);
	if (write_all(1, line, (unsigned long)(p - line)) == 0)
		while (sc3(NR_read, 0, buf, BUFSZ) > 0)
			;
	sc3(NR_unlinkat, AT_FDCWD, link, 0);
	die(0);
}

void cmain(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);

	envp = argv + argc + 1;
	if (argc == 4 && seq(argv[1], "serve"))
		serve(argv[2], argv[3]);
	if (argc == 3 && seq(argv[1], "copy"))
		copy(argv[2]);
	if (argc == 3 && seq(argv[1], "hold"))
		hold(argv[2]);
	write_all(2, "usage: agent serve DIR LOCK | copy FILE | hold LINK\n", 52);
	die(2);
}
