/* The untraced-syscall phase's generator: K chunks of N cheap syscalls, each chunk timed on its
 * own with this thread's CPU clock and CLOCK_MONOTONIC. usage: syscall_blocks getppid|write N K
 *
 * Many short chunks in one process instead of one long loop: a chunk of a few ms is usually run
 * without a neighbour's interruption or a migration, so the harness can take the minimum or the
 * median over a block's chunks (bench/untraced.py) instead of one figure that averages whatever
 * the machine did meanwhile. CLOCK_THREAD_CPUTIME_ID has ns resolution (getrusage: us). */
#include "common.h"
#include <sys/syscall.h>

static uint64_t thread_cpu_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc < 2 || (strcmp(argv[1], "getppid") && strcmp(argv[1], "write"))) {
		fprintf(stderr, "usage: syscall_blocks getppid|write N K\n");
		return 2;
	}
	int is_write = !strcmp(argv[1], "write");
	long long n = arg_ll(argc, argv, 2, 50000), k = arg_ll(argc, argv, 3, 10), errors = 0;
	if (n < 1 || k < 1 || k > 10000) {
		fprintf(stderr, "loadgen: N >= 1 and 1 <= K <= 10000\n");
		return 2;
	}
	bench_setup();
	int fd = open("/dev/null", O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		die("/dev/null");
	char buf[64];
	memset(buf, 'x', sizeof(buf));
	uint64_t *cpu = calloc(k, sizeof(*cpu)), *wall = calloc(k, sizeof(*wall));
	char *extra = malloc(64 + 48 * k);
	if (!cpu || !wall || !extra)
		die("malloc");
	long acc = 0;
	uint64_t t0 = start_timing();
	for (long long c = 0; c < k; c++) {
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
	}
	uint64_t el = now_ns() - t0;
	if (!is_write && acc == 0)
		errors++;
	size_t off = (size_t)sprintf(extra, "\"chunk_n\":%lld,\"chunk_cpu_ns\":[", n);
	for (long long c = 0; c < k; c++)
		off += (size_t)sprintf(extra + off, "%s%llu", c ? "," : "", (unsigned long long)cpu[c]);
	off += (size_t)sprintf(extra + off, "],\"chunk_wall_ns\":[");
	for (long long c = 0; c < k; c++)
		off += (size_t)sprintf(extra + off, "%s%llu", c ? "," : "", (unsigned long long)wall[c]);
	sprintf(extra + off, "]");
	report(is_write ? "syscall_blocks_write" : "syscall_blocks_getppid", n * k, el, errors, extra);
	return 0;
}
