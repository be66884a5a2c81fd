/* exec storm: fork + exec /bin/true, one at a time. usage: exec_storm N */
#include "common.h"
#include <sys/wait.h>

int main(int argc, char **argv)
{
	long long n = arg_ll(argc, argv, 1, 1000), errors = 0;
	bench_setup();
	uint64_t t0 = start_timing();
	for (long long i = 0; i < n; i++) {
		pid_t pid = fork();
		if (pid < 0)
			die("fork");
		if (pid == 0) {
			execl("/bin/true", "true", (char *)NULL);
			_exit(127);
		}
		int st;
		if (waitpid(pid, &st, 0) < 0)
			die("waitpid");
		if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
			errors++;
	}
	report("exec_storm", n, now_ns() - t0, errors, NULL);
	return 0;
}
