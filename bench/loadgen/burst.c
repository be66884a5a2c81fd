/* exec burst: N execs of /bin/true as fast as the machine allows, with up to INFLIGHT children
 * alive at once (posix_spawn, which uses vfork-style CLONE_VM, to keep the parent out of the
 * way). Sizes the tracer's ring buffer: the execs arrive faster than any serial storm.
 * usage: burst N [INFLIGHT] */
#include "common.h"
#include <spawn.h>
#include <sys/wait.h>

extern char **environ;

int main(int argc, char **argv)
{
	long long n = arg_ll(argc, argv, 1, 10000), inflight = arg_ll(argc, argv, 2, 64), errors = 0;
	if (inflight < 1)
		inflight = 1;
	bench_setup();
	char *const args[] = {"true", NULL};
	long long started = 0, alive = 0;
	uint64_t t0 = start_timing();
	while (started < n || alive > 0) {
		while (started < n && alive < inflight) {
			pid_t pid;
			int e = posix_spawn(&pid, "/bin/true", NULL, NULL, args, environ);
			if (e) {
				errno = e;
				die("posix_spawn");
			}
			started++;
			alive++;
		}
		int st;
		pid_t p = waitpid(-1, &st, 0);
		if (p < 0)
			die("waitpid");
		alive--;
		if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
			errors++;
	}
	uint64_t el = now_ns() - t0;
	char extra[64];
	snprintf(extra, sizeof(extra), "\"rate_per_s\":%.0f", n * 1e9 / (double)el);
	report("burst", n, el, errors, extra);
	return 0;
}
