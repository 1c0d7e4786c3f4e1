// SPDX-License-Identifier: GPL-2.0
/*
 * kbridge-bpf: load kbridge's CO-RE probe object (probe.bpf.c), configure it, attach it,
 * stream its hits and report exact counts. Linked statically against libbpf, libelf and
 * zlib, so it runs in kbridge's busybox initramfs as it is (kbridge/images/bpftools.py).
 *
 *   kbridge-bpf OBJ [--kprobe SYM[+OFF]] [--kretprobe SYM [--emit entry,ret] [--maxactive N]]
 *               [--regs R1,R2] [--syscall] [--pid P] [--tid T] [--comm C] [--exclude P1,P2]
 *               [--out PATH] [--run ID] [--ringbuf-mb N] [--btf PATH] [--func-ip 0|1]
 *               [--duration S] [--verbose]
 *
 * Every probe is configured here, at load time: the symbol and offset when attaching, the
 * filters and the registers to read (--regs: numbers of probe.bpf.c's KB_REG table, which the
 * host maps argument positions to) in the object's .rodata. Nothing is compiled per probe.
 *
 * Output, one line each, on --out (a virtio-serial port the host reads) and, for the JSON
 * messages, on stdout too:
 *   {"ev":"ready",...}   every probe is attached;
 *   H<RUN> <base64>      one hit: the first 80 + 8 * nargs bytes of struct kb_event;
 *   {"ev":"end",...}     after SIGINT/SIGTERM (or --duration): the probes were detached first,
 *                        then the ring buffer drained, so counts[h] == streamed[h] + lost[h];
 *   {"ev":"error","stage":...,"errno":...,"message":...}  and exit status 1, nothing attached.
 * Without --out, stdout gets each hit as a JSON line instead (for reading by eye).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/perf_event.h>
#include <linux/types.h>
#include <bpf/bpf.h>
#include <bpf/btf.h>
#include <bpf/libbpf.h>
#include "kb_event.h"

_Static_assert(sizeof(struct kb_event) == KB_EVENT_FIXED + 8 * KB_MAX_ARGS, "kb_event layout");
_Static_assert(__builtin_offsetof(struct kb_event, args) == KB_EVENT_FIXED, "kb_event layout");

#if defined(__x86_64__)
#define ARCH "x86_64"
#define NREGS 7			/* probe.bpf.c KB_REG: di si dx cx r8 r9 r10 */
#elif defined(__aarch64__)
#define ARCH "arm64"
#define NREGS 8			/* x0..x7 */
#else
#error "x86_64 or arm64"
#endif

static const char *handler_names[KB_NHANDLERS] = { "pre", "post", "entry", "ret" };

static volatile sig_atomic_t stopping;
static const char *run_id = "";
static int out_fd = 1;
static bool out_is_stdout = true;
static uint64_t streamed[KB_NHANDLERS];

/* ---- output ----------------------------------------------------------------------- */

static char obuf[1 << 20];
static size_t olen;
static bool out_dead;			/* --out failed or its reader is gone: output is dropped */
static uint64_t unsent;			/* hits taken from the ring buffer that never left */

static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* The hit lines ("H...") in obuf[from..olen): written out only partly or not at all. */
static void count_unsent(size_t from)
{
	size_t pos = 0;

	while (pos < olen) {
		char *nl = memchr(obuf + pos, '\n', olen - pos);
		size_t end = nl ? (size_t)(nl - obuf) + 1 : olen;

		if (end > from && (obuf[pos] == 'H' || !strncmp(obuf + pos, "{\"h\":", 5)))
			unsent++;
		pos = end;
	}
}

static void flush_out(void)
{
	size_t off = 0;
	double give_up = 0;

	while (off < olen && !out_dead) {
		if (stopping && !give_up) {
			/* From here on a write must not block for good: a virtio port blocks while no
			 * host reads it. Wait for the reader up to 2 s without progress, then drop the
			 * rest (counted as lost), so the probes are detached and the counts still
			 * reach stdout. */
			fcntl(out_fd, F_SETFL, fcntl(out_fd, F_GETFL) | O_NONBLOCK);
			give_up = now_ms() + 2000;
		}
		ssize_t n = write(out_fd, obuf + off, olen - off);

		if (n > 0) {
			off += n;
			if (give_up)
				give_up = now_ms() + 2000;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;	/* stopping now, most likely: the next round is non-blocking */
		if (n < 0 && errno == EAGAIN && give_up && now_ms() < give_up) {
			struct pollfd p = { .fd = out_fd, .events = POLLOUT };

			poll(&p, 1, 100);
			continue;
		}
		fprintf(stderr, "kbridge-bpf: --out: %s; dropping further output\n",
			n < 0 && errno != EAGAIN ? strerror(errno) : "nobody reads it");
		out_dead = true;
	}
	if (off < olen)
		count_unsent(off);
	olen = 0;
}

static void put(const void *p, size_t n)
{
	if (olen + n > sizeof(obuf))
		flush_out();
	memcpy(obuf + olen, p, n);
	olen += n;
}

/* A control message: a JSON line on --out, and on stdout when --out is elsewhere. */
static void message(const char *fmt, ...)
{
	char text[4096];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(text, sizeof(text) - 1, fmt, ap);
	va_end(ap);
	if (n < 0 || n >= (int)sizeof(text) - 1)
		n = sizeof(text) - 2;
	text[n++] = '\n';
	put(text, n);
	flush_out();
	if (!out_is_stdout && write(1, text, n) < 0)
		exit(1);
}

static void json_string(char *dst, size_t size, const char *src, size_t len)
{
	size_t o = 0;

	for (size_t i = 0; i < len && src[i] && o + 7 < size; i++) {
		unsigned char c = src[i];

		if (c == '"' || c == '\\')
			o += snprintf(dst + o, size - o, "\\%c", c);
		else if (c < 0x20 || c >= 0x7f)
			o += snprintf(dst + o, size - o, "\\u%04x", c);
		else
			dst[o++] = c;
	}
	dst[o] = 0;
}

/* Report an error (ERR: the errno, 0 for none: kbridge explains EILSEQ, EINVAL, ENOENT...) and exit. */
static void fail(const char *stage, int err, const char *fmt, ...)
{
	char text[1024], esc[2048];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(text, sizeof(text), fmt, ap);
	va_end(ap);
	json_string(esc, sizeof(esc), text, strlen(text));
	message("{\"ev\":\"error\",\"run\":\"%s\",\"stage\":\"%s\",\"errno\":%d,\"message\":\"%s\"}",
		run_id, stage, err, esc);
	exit(1);
}

static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static size_t base64(char *dst, const unsigned char *src, size_t n)
{
	size_t o = 0;

	for (size_t i = 0; i < n; i += 3) {
		unsigned v = src[i] << 16 | (i + 1 < n ? src[i + 1] << 8 : 0) | (i + 2 < n ? src[i + 2] : 0);

		dst[o++] = b64[v >> 18 & 63];
		dst[o++] = b64[v >> 12 & 63];
		dst[o++] = i + 1 < n ? b64[v >> 6 & 63] : '=';
		dst[o++] = i + 2 < n ? b64[v & 63] : '=';
	}
	return o;
}

static int on_event(void *ctx, void *data, size_t size)
{
	const struct kb_event *e = data;
	size_t n = KB_EVENT_FIXED + 8 * (size_t)e->nargs;
	char line[1024];
	int o;

	(void)ctx;
	if (size < sizeof(*e) || e->handler >= KB_NHANDLERS)
		return 0;
	streamed[e->handler]++;
	if (!out_is_stdout) {
		/* The host decodes the record (Python under TCG would be the bottleneck here). */
		o = snprintf(line, sizeof(line), "H%s ", run_id);
		o += base64(line + o, data, n);
		line[o++] = '\n';
		put(line, o);
		return 0;
	}
	char comm[64];

	json_string(comm, sizeof(comm), e->comm, KB_COMM_LEN);
	o = snprintf(line, sizeof(line),
		     "{\"h\":\"%s\",\"pid\":%u,\"tid\":%u,\"cpu\":%u,\"comm\":\"%s\",\"ts\":%llu,"
		     "\"addr\":%llu,\"ip\":%llu,\"flags\":%llu,\"ret\":%lld,\"duration\":%llu,\"args\":[",
		     handler_names[e->handler], e->pid, e->tid, e->cpu, comm, (unsigned long long)e->ts,
		     (unsigned long long)e->addr, (unsigned long long)e->ip, (unsigned long long)e->flags,
		     (long long)e->ret, (unsigned long long)e->duration);
	for (int i = 0; i < e->nargs && i < KB_MAX_ARGS; i++)
		o += snprintf(line + o, sizeof(line) - o, "%s%llu", i ? "," : "", (unsigned long long)e->args[i]);
	o += snprintf(line + o, sizeof(line) - o, "]}\n");
	put(line, o);
	return 0;
}

/* ---- a kretprobe with maxactive: tracefs, since libbpf 1.1's kprobe opts have no maxactive ---- */

static char legacy_event[128];	/* "kbridge_PID/kb_ret", deleted at exit */

static const char *tracefs(void)
{
	return access("/sys/kernel/tracing/kprobe_events", W_OK) == 0 ? "/sys/kernel/tracing"
								      : "/sys/kernel/debug/tracing";
}

static int write_kprobe_events(const char *line)
{
	char path[256];
	int fd, err = 0;

	snprintf(path, sizeof(path), "%s/kprobe_events", tracefs());
	fd = open(path, O_WRONLY | O_APPEND | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (write(fd, line, strlen(line)) < 0)
		err = -errno;
	close(fd);
	return err;
}

static void remove_legacy_event(void)
{
	char line[160];

	if (!legacy_event[0])
		return;
	snprintf(line, sizeof(line), "-:%s", legacy_event);
	write_kprobe_events(line);
	legacy_event[0] = 0;
}

static struct bpf_link *attach_kretprobe_maxactive(struct bpf_program *prog, const char *sym, int maxactive)
{
	struct perf_event_attr attr = { .size = sizeof(attr), .type = PERF_TYPE_TRACEPOINT,
					.sample_period = 1, .wakeup_events = 1 };
	char line[512], path[256], idtext[32] = "";
	struct bpf_link *link;
	int fd, pfd, err;

	snprintf(legacy_event, sizeof(legacy_event), "kbridge_%d/kb_ret", getpid());
	snprintf(line, sizeof(line), "r%d:%s %s", maxactive, legacy_event, sym);
	err = write_kprobe_events(line);
	if (err) {
		legacy_event[0] = 0;
		errno = -err;
		return NULL;
	}
	snprintf(path, sizeof(path), "%s/events/%s/id", tracefs(), legacy_event);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || read(fd, idtext, sizeof(idtext) - 1) <= 0)
		return NULL;
	close(fd);
	attr.config = strtoull(idtext, NULL, 10);
	pfd = syscall(__NR_perf_event_open, &attr, -1, 0, -1, PERF_FLAG_FD_CLOEXEC);
	if (pfd < 0)
		return NULL;
	link = bpf_program__attach_perf_event(prog, pfd);	/* the link owns pfd */
	if (!link)
		close(pfd);
	return link;
}

/* ---- the rest ---------------------------------------------------------------------- */

static bool verbose;

static int libbpf_log(enum libbpf_print_level level, const char *fmt, va_list ap)
{
	if (level == LIBBPF_DEBUG && !verbose)
		return 0;
	return vfprintf(stderr, fmt, ap);
}

static void on_signal(int sig)
{
	(void)sig;
	stopping = 1;
}

/* The offset of variable NAME in the object's .rodata (from its BTF DATASEC). */
static long rodata_offset(struct bpf_object *obj, const char *name)
{
	const struct btf *btf = bpf_object__btf(obj);
	int id = btf ? btf__find_by_name_kind(btf, ".rodata", BTF_KIND_DATASEC) : -1;
	const struct btf_type *sec;
	const struct btf_var_secinfo *v;

	if (id < 0)
		return -1;
	sec = btf__type_by_id(btf, id);
	v = btf_var_secinfos(sec);
	for (int i = 0; i < btf_vlen(sec); i++, v++)
		if (!strcmp(btf__name_by_offset(btf, btf__type_by_id(btf, v->type)->name_off), name))
			return v->offset;
	return -1;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: kbridge-bpf OBJ [--kprobe SYM[+OFF]] [--kretprobe SYM [--emit entry,ret] [--maxactive N]]\n"
		"       [--regs R1,R2] [--syscall] [--pid P] [--tid T] [--comm C] [--exclude P1,P2]\n"
		"       [--out PATH] [--run ID] [--ringbuf-mb N] [--btf PATH] [--func-ip 0|1]\n"
		"       [--duration S] [--verbose]\n");
	exit(2);
}

/* A number in [0, MAX], or the error message quoting it. */
static unsigned long number(const char *opt, const char *v, unsigned long max)
{
	char *end;
	unsigned long n;

	errno = 0;
	n = strtoul(v, &end, 0);
	if (errno || end == v || *end || n > max)
		fail("args", 0, "%s %s: a number from 0 to %lu", opt, v, max);
	return n;
}

int main(int argc, char **argv)
{
	const char *obj_path = NULL, *kprobe = NULL, *kretprobe = NULL, *out = NULL, *btf_path = NULL;
	const char *regs = NULL, *exclude = NULL, *comm = NULL;
	int maxactive = 0, ringbuf_mb = 16, func_ip = -1;
	bool emit_entry = false, emit_ret = true;
	double duration = 0;
	struct kb_config cfg = {};

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
#define OPT(name) (!strcmp(a, name) && (v || (usage(), 0)) && ++i)
		if (OPT("--kprobe"))
			kprobe = v;
		else if (OPT("--kretprobe"))
			kretprobe = v;
		else if (OPT("--emit")) {
			emit_entry = strstr(v, "entry") != NULL;
			emit_ret = strstr(v, "ret") != NULL;
		} else if (OPT("--maxactive"))
			maxactive = number(a, v, 4096);
		else if (OPT("--regs"))
			regs = v;
		else if (!strcmp(a, "--syscall"))
			cfg.syscall = 1;
		else if (OPT("--pid"))
			cfg.tgid = number(a, v, UINT32_MAX);
		else if (OPT("--tid"))
			cfg.tid = number(a, v, UINT32_MAX);
		else if (OPT("--comm"))
			comm = v;
		else if (OPT("--exclude"))
			exclude = v;
		else if (OPT("--out"))
			out = v;
		else if (OPT("--run"))
			run_id = v;
		else if (OPT("--ringbuf-mb"))
			ringbuf_mb = number(a, v, 1024);
		else if (OPT("--btf"))
			btf_path = v;
		else if (OPT("--func-ip"))
			func_ip = number(a, v, 1);
		else if (OPT("--duration"))
			duration = atof(v);
		else if (!strcmp(a, "--verbose"))
			verbose = true;
		else if (a[0] != '-' && !obj_path)
			obj_path = a;
		else
			usage();
	}
	if (!obj_path || (!kprobe && !kretprobe) || strlen(run_id) > 32)
		usage();

	double t0 = now_ms();
	struct sigaction sa = { .sa_handler = on_signal };	/* no SA_RESTART: poll returns EINTR */
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	libbpf_set_print(libbpf_log);
	/* 5.10 charges BPF maps to RLIMIT_MEMLOCK (memcg accounting came in 5.11). */
	struct rlimit unlimited = { RLIM_INFINITY, RLIM_INFINITY };
	setrlimit(RLIMIT_MEMLOCK, &unlimited);

	if (out && strcmp(out, "-")) {
		int fd = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

		if (fd < 0)
			fail("open", errno, "cannot open --out %s: %s", out, strerror(errno));
		out_fd = fd;
		out_is_stdout = false;
	}

	/* The probe: SYM[+OFF] for the kprobe, SYM for the kretprobe. */
	char ksym[256] = "";
	unsigned long offset = 0;
	if (kprobe) {
		const char *plus = strchr(kprobe, '+');
		size_t n = plus ? (size_t)(plus - kprobe) : strlen(kprobe);

		if (n >= sizeof(ksym))
			fail("args", 0, "symbol too long");
		memcpy(ksym, kprobe, n);
		ksym[n] = 0;
		offset = plus ? number("--kprobe offset", plus + 1, 1 << 20) : 0;
	}
	for (const char *p = regs; p && *p;) {
		char *end;
		long r = strtol(p, &end, 10);

		if (end == p || r < 0 || r >= NREGS || cfg.nargs >= KB_MAX_ARGS)
			fail("args", 0, "--regs %s: register numbers 0..%d, at most %d", regs, NREGS - 1, KB_MAX_ARGS);
		cfg.arg_reg[cfg.nargs++] = r;
		p = *end == ',' ? end + 1 : end;
	}
	if (comm) {
		if (strlen(comm) >= KB_COMM_LEN)
			fail("args", 0, "--comm %s: a comm is at most %d characters", comm, KB_COMM_LEN - 1);
		cfg.has_comm = 1;
		strncpy(cfg.comm, comm, sizeof(cfg.comm));
	}
	cfg.emit_entry = kretprobe && emit_entry;
	cfg.track_ret = kretprobe && emit_ret;
	/* bpf_get_func_ip in kprobes came in 5.15: the host knows the kernel, else ask it (a load). */
	cfg.have_func_ip = func_ip >= 0 ? func_ip
					: libbpf_probe_bpf_helper(BPF_PROG_TYPE_KPROBE, BPF_FUNC_get_func_ip, NULL) == 1;

	/* Open, configure, load. */
	LIBBPF_OPTS(bpf_object_open_opts, oopts, .btf_custom_path = btf_path);
	struct bpf_object *obj = bpf_object__open_file(obj_path, &oopts);
	if (!obj)
		fail("open", errno, "cannot open %s: %s", obj_path, strerror(errno));
	struct bpf_map *rodata = NULL, *map;
	bpf_object__for_each_map(map, obj) {
		const char *name = bpf_map__name(map);
		size_t len = strlen(name);

		if (bpf_map__is_internal(map) && len >= 7 && !strcmp(name + len - 7, ".rodata"))
			rodata = map;
	}
	long cfg_off = rodata_offset(obj, "cfg");
	size_t rosize = 0;
	char *ro = rodata ? (char *)bpf_map__initial_value(rodata, &rosize) : NULL;
	if (!ro || cfg_off < 0 || cfg_off + sizeof(cfg) > rosize)
		fail("open", 0, "%s has no kbridge config (cfg in .rodata)", obj_path);
	memcpy(ro + cfg_off, &cfg, sizeof(cfg));

	struct bpf_program *p_pre = bpf_object__find_program_by_name(obj, "kb_pre");
	struct bpf_program *p_entry = bpf_object__find_program_by_name(obj, "kb_entry");
	struct bpf_program *p_ret = bpf_object__find_program_by_name(obj, "kb_ret");
	if (!p_pre || !p_entry || !p_ret)
		fail("open", 0, "%s lacks kb_pre/kb_entry/kb_ret", obj_path);
	bpf_program__set_autoload(p_pre, kprobe != NULL);
	bpf_program__set_autoload(p_entry, kretprobe != NULL);
	bpf_program__set_autoload(p_ret, kretprobe && emit_ret);
	bpf_map__set_max_entries(bpf_object__find_map_by_name(obj, "inflight"), cfg.track_ret ? 10240 : 1);
	bpf_map__set_max_entries(bpf_object__find_map_by_name(obj, "events"), (unsigned)ringbuf_mb << 20);
	double t_open = now_ms();
	int err = bpf_object__load(obj);
	if (err)
		fail("load", -err, "loading %s failed: %s (--verbose shows the verifier log)", obj_path, strerror(-err));
	double t_load = now_ms();

	int excl_fd = bpf_map__fd(bpf_object__find_map_by_name(obj, "excluded"));
	__u8 one = 1;
	__u32 self = getpid();
	bpf_map_update_elem(excl_fd, &self, &one, BPF_ANY);
	for (const char *p = exclude; p && *p;) {
		char *end;
		__u32 t = strtoul(p, &end, 10);

		if (end == p)
			fail("args", 0, "--exclude %s: a comma-separated list of pids", exclude);
		if (bpf_map_update_elem(excl_fd, &t, &one, BPF_ANY))
			fail("args", 0, "--exclude: more than 63 pids");
		p = *end == ',' ? end + 1 : end;
	}

	struct ring_buffer *rb = ring_buffer__new(bpf_map__fd(bpf_object__find_map_by_name(obj, "events")),
						  on_event, NULL, NULL);
	if (!rb)
		fail("load", errno, "ring buffer: %s", strerror(errno));

	/* Attach: the return probe before its entry, so an entry remembered is a return seen. */
	struct bpf_link *links[3] = {};
	int nlinks = 0;
	const char *failing = kretprobe;
	if (kretprobe && emit_ret) {
		LIBBPF_OPTS(bpf_kprobe_opts, ko, .retprobe = true);
		links[nlinks] = maxactive > 0 ? attach_kretprobe_maxactive(p_ret, kretprobe, maxactive)
					      : bpf_program__attach_kprobe_opts(p_ret, kretprobe, &ko);
		if (!links[nlinks++])
			goto attach_failed;
	}
	if (kretprobe) {
		LIBBPF_OPTS(bpf_kprobe_opts, ko);
		if (!(links[nlinks++] = bpf_program__attach_kprobe_opts(p_entry, kretprobe, &ko)))
			goto attach_failed;
	}
	if (kprobe) {
		LIBBPF_OPTS(bpf_kprobe_opts, ko, .offset = offset);
		failing = kprobe;
		if (!(links[nlinks++] = bpf_program__attach_kprobe_opts(p_pre, ksym, &ko)))
			goto attach_failed;
	}
	double t_attach = now_ms();

	message("{\"ev\":\"ready\",\"run\":\"%s\",\"format\":%d,\"arch\":\"%s\",\"record\":%d,\"nargs\":%u,"
		"\"func_ip\":%s,\"syscall\":%s,\"loader_pid\":%d,"
		"\"ms\":{\"open\":%.1f,\"load\":%.1f,\"attach\":%.1f}}",
		run_id, KB_FORMAT, ARCH, KB_EVENT_FIXED, cfg.nargs, cfg.have_func_ip ? "true" : "false",
		cfg.syscall ? "true" : "false", getpid(), t_open - t0, t_load - t_open, t_attach - t_load);

	/* ring_buffer__poll() is epoll_wait + consume: split, to time the work apart from the wait. */
	double deadline = duration > 0 ? now_ms() + duration * 1e3 : 0, busy_ms = 0;
	int epfd = ring_buffer__epoll_fd(rb);
	while (!stopping && !(deadline && now_ms() >= deadline)) {
		struct epoll_event ev;

		if (epoll_wait(epfd, &ev, 1, 50) <= 0)
			continue;	/* timeout or EINTR (the signal) */
		double t1 = now_ms();
		err = ring_buffer__consume(rb);
		if (err < 0)
			fail("run", -err, "ring buffer: %s", strerror(-err));
		flush_out();
		busy_ms += now_ms() - t1;
	}

	/* Detach first (entries before their returns), so nothing new arrives; then drain. */
	for (int i = nlinks - 1; i >= 0; i--)
		bpf_link__destroy(links[i]);
	remove_legacy_event();
	ring_buffer__consume(rb);
	flush_out();

	uint64_t total[KB_NCOUNTERS] = {};
	int ncpu = libbpf_num_possible_cpus();
	__u64 *percpu = calloc(ncpu, sizeof(__u64));
	int counts_fd = bpf_map__fd(bpf_object__find_map_by_name(obj, "counts"));
	for (__u32 k = 0; k < KB_NCOUNTERS; k++) {
		if (bpf_map_lookup_elem(counts_fd, &k, percpu))
			fail("end", errno, "reading counts: %s", strerror(errno));
		for (int c = 0; c < ncpu; c++)
			total[k] += percpu[c];
	}
	/* Per handler: hits (exact, in-kernel) == streamed + lost (no room in the ring buffer);
	 * "unsent" hits were taken from it but never written (--out failed while stopping). */
	char per[3][KB_NHANDLERS][24];
	const char *fields[3] = { "counts", "streamed", "lost" };
	for (int h = 0; h < KB_NHANDLERS; h++) {
		snprintf(per[0][h], 24, "%llu", (unsigned long long)total[KB_CNT_HITS + h]);
		snprintf(per[1][h], 24, "%llu", (unsigned long long)streamed[h]);
		snprintf(per[2][h], 24, "%llu", (unsigned long long)total[KB_CNT_LOST + h]);
	}
	char body[1024];
	int o = 0;
	for (int f = 0; f < 3; f++)
		o += snprintf(body + o, sizeof(body) - o, "\"%s\":{\"pre\":%s,\"entry\":%s,\"ret\":%s},", fields[f],
			      per[f][KB_PRE], per[f][KB_ENTRY], per[f][KB_RET]);
	message("{\"ev\":\"end\",\"run\":\"%s\",%s\"unsent\":%llu,\"noslot\":%llu,\"busy_ms\":%.1f,"
		"\"out_failed\":%s}",
		run_id, body, (unsigned long long)unsent, (unsigned long long)total[KB_CNT_NOSLOT], busy_ms,
		out_dead ? "true" : "false");
	ring_buffer__free(rb);
	bpf_object__close(obj);
	return 0;

attach_failed:
	err = errno;
	for (int i = 0; i < nlinks; i++)
		bpf_link__destroy(links[i]);
	remove_legacy_event();
	fail("attach", err, "cannot attach to %s: %s", failing, strerror(err));
	return 1;
}
