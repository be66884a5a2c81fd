/* The untraced-syscall phase's generator: chunks of N cheap syscalls, each chunk timed on its
 * own with this thread's CPU clock and CLOCK_MONOTONIC.
 * usage: syscall_blocks getppid|write|mix N K [follow]
 *   mix: getppid and write chunks alternated; follow: run until stdin reaches EOF (K at most),
 *   so the harness can stop a tracer while the chunks run and compare the chunks either side.
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

static int stdin_closed(void)
{
	struct pollfd p = {.fd = 0, .events = POLLIN};
	char b[64];
	if (poll(&p, 1, 0) <= 0)
		return 0;
	return read(0, b, sizeof(b)) <= 0;
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "";
	if (strcmp(mode, "getppid") && strcmp(mode, "write") && strcmp(mode, "mix")) {
		fprintf(stderr, "usage: syscall_blocks getppid|write|mix N K [follow]\n");
		return 2;
	}
	long long n = arg_ll(argc, argv, 2, 50000), k = arg_ll(argc, argv, 3, 10), errors = 0;
	int follow = argc > 4 && !strcmp(argv[4], "follow");
	if (n < 1 || k < 1 || k > 200000) {
		fprintf(stderr, "loadgen: N >= 1 and 1 <= K <= 200000\n");
		return 2;
	}
	bench_setup();
	int fd = open("/dev/null", O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		die("/dev/null");
	char buf[64];
	memset(buf, 'x', sizeof(buf));
	uint64_t *cpu = calloc(k, sizeof(*cpu)), *wall = calloc(k, sizeof(*wall)), *at = calloc(k, sizeof(*at));
	char *extra = malloc(128 + 66 * (size_t)k);
	if (!cpu || !wall || !at || !extra)
		die("malloc");
	long acc = 0;
	long long done = 0;
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
		if (follow && stdin_closed()) /* between chunks: outside every timed part */
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
	return 0;
}
