/* rate-controlled event generator for the zero-drop sweep: RATE operations per second for
 * MILLISECONDS, paced in 1 ms slices with absolute sleeps (no busy wait: on a 2-core node a
 * spinning generator would steal the tracer's CPU and move the drop point).
 * MODE: exec (posix_spawn /bin/true, up to 256 alive), refused (connect to a closed loopback
 * port), connect (connect + RST close to a listener thread).
 * Prints how many operations it really did: when the machine cannot keep up, n/elapsed is the
 * rate that was achieved, not the one asked for.
 * usage: rate MODE RATE MILLISECONDS */
#include "net.h"
#include <spawn.h>
#include <sys/wait.h>

extern char **environ;

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: rate exec|refused|connect RATE MILLISECONDS\n");
		return 2;
	}
	const char *mode = argv[1];
	long long rate = arg_ll(argc, argv, 2, 1000), ms = arg_ll(argc, argv, 3, 1000);
	int m = !strcmp(mode, "exec") ? 0 : !strcmp(mode, "refused") ? 1 : !strcmp(mode, "connect") ? 2 : -1;
	if (m < 0 || rate < 1) {
		fprintf(stderr, "rate: bad mode or rate\n");
		return 2;
	}
	bench_setup();
	struct sockaddr_in addr;
	int lfd = -1;
	if (m == 1)
		addr = closed_port();
	if (m == 2) {
		lfd = listen_loopback(&addr);
		pthread_t th;
		pthread_create(&th, NULL, accept_and_close, &lfd);
	}
	char *const args[] = {"true", NULL};
	long long total = rate * ms / 1000, done = 0, errors = 0, alive = 0;
	uint64_t t0 = now_ns();
	for (long long slice = 0; done < total; slice++) {
		long long due = (rate * (slice + 1)) / 1000;
		if (due > total)
			due = total;
		for (; done < due; done++) {
			if (m == 0) {
				while (alive >= 256) {
					if (waitpid(-1, NULL, 0) > 0)
						alive--;
				}
				pid_t pid;
				if (posix_spawn(&pid, "/bin/true", NULL, NULL, args, environ))
					errors++;
				else
					alive++;
				while (alive > 0 && waitpid(-1, NULL, WNOHANG) > 0)
					alive--;
			} else {
				int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
				if (fd < 0)
					die("socket");
				int r = connect(fd, (struct sockaddr *)&addr, sizeof(addr));
				if (m == 1 ? (r == 0 || errno != ECONNREFUSED) : r < 0)
					errors++;
				if (m == 2)
					close_rst(fd);
				else
					close(fd);
			}
		}
		uint64_t next = t0 + (uint64_t)(slice + 1) * 1000000ull;
		if (now_ns() < next) {
			struct timespec ts = {(time_t)(next / 1000000000ull), (long)(next % 1000000000ull)};
			clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
		}
	}
	uint64_t el = now_ns() - t0;
	while (alive > 0 && waitpid(-1, NULL, 0) > 0)
		alive--;
	char extra[96];
	snprintf(extra, sizeof(extra), "\"mode\":\"%s\",\"target_rate\":%lld,\"rate_per_s\":%.0f", mode, rate,
		 done * 1e9 / (double)el);
	report("rate", done, el, errors, extra);
	return 0;
}
