/* refused-connect storm: connect to a loopback port nobody listens on. usage: refused_storm N */
#include "net.h"

int main(int argc, char **argv)
{
	long long n = arg_ll(argc, argv, 1, 1000), errors = 0;
	bench_setup();
	struct sockaddr_in addr = closed_port();
	uint64_t t0 = start_timing();
	for (long long i = 0; i < n; i++) {
		int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd < 0)
			die("socket");
		if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) == 0 || errno != ECONNREFUSED)
			errors++;
		close(fd);
	}
	report("refused_storm", n, now_ns() - t0, errors, NULL);
	return 0;
}
