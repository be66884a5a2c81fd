/* untraced syscall loop: getppid through syscall(2) so no libc caching can hide the syscall.
 * usage: getppid_loop N */
#include "common.h"
#include <sys/syscall.h>

int main(int argc, char **argv)
{
	long long n = arg_ll(argc, argv, 1, 1000000);
	bench_setup();
	long acc = 0;
	uint64_t t0 = start_timing();
	for (long long i = 0; i < n; i++)
		acc += syscall(SYS_getppid);
	uint64_t el = now_ns() - t0;
	report("getppid_loop", n, el, acc == 0, NULL);
	return 0;
}
