/* Shared by every load generator: joining the agent cgroup, timing, one JSON result line.
 *
 * The harness starts each generator with BENCH_CGROUP=<cgroup dir> when the workload runs
 * inside the agent cgroup. Joining happens here, before the timed part, so the generator's
 * own exec is the only event produced outside the measurement and every child it forks is
 * born inside the cgroup (no wrapper shell whose exec a tracer would also see).
 * BENCH_AUID sets the audit login uid so auditd rules can be scoped to the "agent": auditd
 * has no cgroup filter, the login uid is the narrowest identity it can match on.
 */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/resource.h>
#include <unistd.h>

static inline uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* CPU time (user + system) of this process, all its threads, and its reaped children, in ns.
 * Beside the wall clock because it barely moves when a neighbour takes the other core, while
 * a tracer's in-task costs (BPF programs, the syscall slow path, audit) land in it in full. */
static inline uint64_t cpu_ns(void)
{
	struct rusage s, c;
	getrusage(RUSAGE_SELF, &s);
	getrusage(RUSAGE_CHILDREN, &c);
	uint64_t us = (uint64_t)(s.ru_utime.tv_sec + s.ru_stime.tv_sec + c.ru_utime.tv_sec + c.ru_stime.tv_sec) * 1000000ull +
		      (uint64_t)(s.ru_utime.tv_usec + s.ru_stime.tv_usec + c.ru_utime.tv_usec + c.ru_stime.tv_usec);
	return us * 1000ull;
}

static uint64_t bench_cpu0;

/* Starts both clocks; report() stops them. */
static inline uint64_t start_timing(void)
{
	bench_cpu0 = cpu_ns();
	return now_ns();
}

static inline void die(const char *what)
{
	fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
	exit(1);
}

static inline void write_file(const char *path, const char *val)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		die(path);
	if (write(fd, val, strlen(val)) < 0)
		die(path);
	close(fd);
}

static inline void bench_setup(void)
{
	const char *cg = getenv("BENCH_CGROUP");
	const char *auid = getenv("BENCH_AUID");
	if (cg && *cg) {
		char path[4096];
		snprintf(path, sizeof(path), "%s/cgroup.procs", cg);
		write_file(path, "0"); /* "0" moves the writing process itself */
	}
	if (auid && *auid)
		write_file("/proc/self/loginuid", auid);
}

static long long arg_ll(int argc, char **argv, int i, long long dflt)
{
	if (i >= argc)
		return dflt;
	char *end;
	errno = 0;
	long long v = strtoll(argv[i], &end, 10);
	if (errno || *end || v < 0) {
		fprintf(stderr, "loadgen: argument %d: not a non-negative integer: '%s'\n", i, argv[i]);
		exit(2);
	}
	return v;
}

/* One line, parsed by the harness: {"gen":..., "n":..., "elapsed_ns":..., "cpu_ns":..., "errors":..., extra} */
static inline void report(const char *gen, long long n, uint64_t elapsed, long long errors, const char *extra)
{
	unsigned long long cpu = cpu_ns() - bench_cpu0;
	printf("{\"gen\":\"%s\",\"n\":%lld,\"elapsed_ns\":%llu,\"cpu_ns\":%llu,\"errors\":%lld%s%s}\n", gen, n,
	       (unsigned long long)elapsed, cpu, errors, extra ? "," : "", extra ? extra : "");
	fflush(stdout);
}

#endif
