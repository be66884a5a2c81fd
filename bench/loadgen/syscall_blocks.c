/* The untraced-syscall phase's generator: chunks of N cheap syscalls, each chunk timed on its
 * own with this thread's CPU clock and CLOCK_MONOTONIC.
 * usage: syscall_blocks getppid|write|mix N K [follow]   one run, one JSON line
 *        syscall_blocks serve N                           one run per command line on stdin:
 *                                                         "getppid|write|mix K [follow]"
 *   mix: getppid and write chunks alternated; follow: run until stdin has input (a line, or
 *   EOF; K at most), so the harness can stop a tracer while the chunks run and compare the
 *   chunks either side. `serve` keeps one process for a whole phase: a fresh process per block
 *   costs the same syscalls up to ~12% more or less (its task, stack and pages placed anew),
 *   which neighbouring blocks of one process do not differ by.
 *
 * Many short chunks in one process instead of one long loop: a chunk of a fraction of a ms is
 * usually run without an interruption, so the harness can take the minimum or the median over
 * chunks (bench/untraced.py) instead of one figure that averages whatever the machine did.
 * CLOCK_THREAD_CPUTIME_ID has ns resolution (getrusage: us). */
#include "common.h"
#include <poll.h>
#include <sys/syscall.h>

static uint64_t thread_cpu_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static size_t put_list(char *out, const char *name, const uint64_t *v, long long k)
{
	size_t off = (size_t)sprintf(out, ",\"%s\":[", name);
	for (long long c = 0; c < k; c++)
		off += (size_t)sprintf(out + off, "%s%llu", c ? "," : "", (unsigned long long)v[c]);
	out[off++] = ']';
	out[off] = 0;
	return off;
}

static int stdin_ready(void)
{
	struct pollfd p = {.fd = 0, .events = POLLIN};
	return poll(&p, 1, 0) > 0;
}

/* One line from fd 0 without stdio's buffer (poll must see what is unread); 0 at EOF. */
static int read_line(char *buf, size_t len)
{
	size_t i = 0;
	while (i + 1 < len) {
		char ch;
		ssize_t r = read(0, &ch, 1);
		if (r <= 0)
			return i > 0;
		if (ch == '\n')
			break;
		buf[i++] = ch;
	}
	buf[i] = 0;
	return 1;
}

static int run(const char *mode, long long n, long long k, int follow, int fd)
{
	char buf[64];
	memset(buf, 'x', sizeof(buf));
	uint64_t *cpu = calloc(k, sizeof(*cpu)), *wall = calloc(k, sizeof(*wall)), *at = calloc(k, sizeof(*at));
	char *extra = malloc(128 + 66 * (size_t)k);
	if (!cpu || !wall || !at || !extra)
		die("malloc");
	long acc = 0;
	long long done = 0, errors = 0;
	uint64_t t0 = start_timing();
	for (long long c = 0; c < k; c++) {
		int is_write = !strcmp(mode, "write") || (!strcmp(mode, "mix") && (c & 1));
		uint64_t c0 = thread_cpu_ns(), w0 = now_ns();
		if (is_write) {
			for (long long i = 0; i < n; i++)
				if (write(fd, buf, sizeof(buf)) != sizeof(buf))
					errors++;
		} else {
			for (long long i = 0; i < n; i++)
				acc += syscall(SYS_getppid);
		}
		wall[c] = now_ns() - w0;
		cpu[c] = thread_cpu_ns() - c0;
		at[c] = w0;
		done = c + 1;
		if (follow && stdin_ready()) /* between chunks: outside every timed part */
			break;
	}
	uint64_t el = now_ns() - t0;
	if (strcmp(mode, "write") && acc == 0)
		errors++;
	size_t off = (size_t)sprintf(extra, "\"chunk_n\":%lld,\"mode\":\"%s\"", n, mode);
	off += put_list(extra + off, "chunk_cpu_ns", cpu, done);
	off += put_list(extra + off, "chunk_wall_ns", wall, done);
	put_list(extra + off, "chunk_at_ns", at, done);
	char gen[64];
	snprintf(gen, sizeof(gen), "syscall_blocks_%s", mode);
	report(gen, n * done, el, errors, extra);
	free(cpu);
	free(wall);
	free(at);
	free(extra);
	return 0;
}

static int valid_mode(const char *m)
{
	return !strcmp(m, "getppid") || !strcmp(m, "write") || !strcmp(m, "mix");
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "";
	int serve = !strcmp(mode, "serve");
	if (!serve && !valid_mode(mode)) {
		fprintf(stderr, "usage: syscall_blocks getppid|write|mix N K [follow] | serve N\n");
		return 2;
	}
	long long n = arg_ll(argc, argv, 2, 2000);
	if (n < 1) {
		fprintf(stderr, "loadgen: N >= 1\n");
		return 2;
	}
	bench_setup();
	int fd = open("/dev/null", O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		die("/dev/null");
	if (!serve) {
		long long k = arg_ll(argc, argv, 3, 10);
		if (k < 1 || k > 200000) {
			fprintf(stderr, "loadgen: 1 <= K <= 200000\n");
			return 2;
		}
		return run(mode, n, k, argc > 4 && !strcmp(argv[4], "follow"), fd);
	}
	char line[128], m[16], opt[16];
	while (read_line(line, sizeof(line))) {
		long long k = 0;
		opt[0] = 0;
		if (sscanf(line, "%15s %lld %15s", m, &k, opt) < 2 || !valid_mode(m) || k < 1 || k > 200000) {
			fprintf(stderr, "loadgen: bad command '%s'\n", line);
			return 2;
		}
		int follow = !strcmp(opt, "follow");
		run(m, n, k, follow, fd);
		if (follow && !read_line(line, sizeof(line))) /* the line that ended it */
			break;
	}
	return 0;
}
