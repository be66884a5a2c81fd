/* write-heavy loop: 64-byte writes to /dev/null. usage: write_loop N */
#include "common.h"

int main(int argc, char **argv)
{
	long long n = arg_ll(argc, argv, 1, 1000000), errors = 0;
	bench_setup();
	int fd = open("/dev/null", O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		die("/dev/null");
	char buf[64];
	memset(buf, 'x', sizeof(buf));
	uint64_t t0 = start_timing();
	for (long long i = 0; i < n; i++)
		if (write(fd, buf, sizeof(buf)) != sizeof(buf))
			errors++;
	report("write_loop", n, now_ns() - t0, errors, NULL);
	return 0;
}
