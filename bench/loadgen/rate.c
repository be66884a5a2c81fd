/* rate-controlled event generator for the zero-drop sweep: RATE operations per second for
 * MILLISECONDS, paced in 1 ms slices with absolute sleeps (no busy wait: on a 2-core node a
 * spinning generator would steal the tracer's CPU and move the drop point), split over THREADS
 * threads (connect modes only) so that one thread's syscall cost does not cap the rate.
 * MODE: exec (posix_spawn /bin/true, up to 256 alive), refused (connect to a closed loopback
 * port), connect (connect + RST close to a listener thread), udp (connect(2) again and again on
 * one UDP socket to a loopback port: one syscall, no packet, per connect event — the cheapest
 * event there is to generate, so the tracer rather than the generator sets the ceiling).
 * Prints how many operations it really did: when the machine cannot keep up, n/elapsed is the
 * rate that was achieved, not the one asked for.
 * usage: rate MODE RATE MILLISECONDS [THREADS] */
#include "net.h"
#include <spawn.h>
#include <sys/wait.h>

extern char **environ;

struct worker {
	pthread_t th;
	int mode;
	long long rate, total, done, errors;
	int udp;
	uint64_t t0;
	struct sockaddr_in addr;
};

static void one_exec(struct worker *w, long long *alive)
{
	static char *const args[] = {"true", NULL};
	while (*alive >= 256) {
		if (waitpid(-1, NULL, 0) > 0)
			(*alive)--;
	}
	pid_t pid;
	if (posix_spawn(&pid, "/bin/true", NULL, NULL, args, environ))
		w->errors++;
	else
		(*alive)++;
	while (*alive > 0 && waitpid(-1, NULL, WNOHANG) > 0)
		(*alive)--;
}

static void one_connect(struct worker *w)
{
	if (w->mode == 3) {
		if (connect(w->udp, (struct sockaddr *)&w->addr, sizeof(w->addr)) < 0)
			w->errors++;
		return;
	}
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die("socket");
	int r = connect(fd, (struct sockaddr *)&w->addr, sizeof(w->addr));
	if (w->mode == 1 ? (r == 0 || errno != ECONNREFUSED) : r < 0)
		w->errors++;
	if (w->mode == 2)
		close_rst(fd);
	else
		close(fd);
}

static void *work(void *arg)
{
	struct worker *w = arg;
	long long alive = 0;
	for (long long slice = 0; w->done < w->total; slice++) {
		long long due = (w->rate * (slice + 1)) / 1000;
		if (due > w->total)
			due = w->total;
		for (; w->done < due; w->done++) {
			if (w->mode == 0)
				one_exec(w, &alive);
			else
				one_connect(w);
		}
		uint64_t next = w->t0 + (uint64_t)(slice + 1) * 1000000ull;
		if (now_ns() < next) {
			struct timespec ts = {(time_t)(next / 1000000000ull), (long)(next % 1000000000ull)};
			clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
		}
	}
	while (alive > 0 && waitpid(-1, NULL, 0) > 0)
		alive--;
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: rate exec|refused|connect|udp RATE MILLISECONDS [THREADS]\n");
		return 2;
	}
	const char *mode = argv[1];
	long long rate = arg_ll(argc, argv, 2, 1000), ms = arg_ll(argc, argv, 3, 1000);
	long long nthreads = arg_ll(argc, argv, 4, 1);
	int m = !strcmp(mode, "exec") ? 0 : !strcmp(mode, "refused") ? 1 : !strcmp(mode, "connect") ? 2
		: !strcmp(mode, "udp") ? 3 : -1;
	if (m < 0 || rate < 1 || nthreads < 1 || nthreads > 64) {
		fprintf(stderr, "rate: bad mode, rate or thread count\n");
		return 2;
	}
	if (m == 0)
		nthreads = 1; /* waitpid(-1) would reap other threads' children */
	bench_setup();
	struct sockaddr_in addr;
	memset(&addr, 0, sizeof(addr));
	int lfd = -1;
	if (m == 1 || m == 3)
		addr = closed_port();
	if (m == 2) {
		lfd = listen_loopback(&addr);
		pthread_t th;
		pthread_create(&th, NULL, accept_and_close, &lfd);
	}
	long long total = rate * ms / 1000;
	struct worker *w = calloc(nthreads, sizeof(*w));
	if (!w)
		die("calloc");
	uint64_t t0 = start_timing();
	for (long long i = 0; i < nthreads; i++) {
		w[i].mode = m;
		w[i].addr = addr;
		w[i].t0 = t0;
		w[i].udp = -1;
		if (m == 3 && (w[i].udp = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0)) < 0)
			die("socket");
		w[i].total = total / nthreads + (i < total % nthreads);
		w[i].rate = rate / nthreads + (i < rate % nthreads);
		if (w[i].rate < 1)
			w[i].rate = 1;
		if (pthread_create(&w[i].th, NULL, work, &w[i]))
			die("pthread_create");
	}
	long long done = 0, errors = 0;
	for (long long i = 0; i < nthreads; i++) {
		pthread_join(w[i].th, NULL);
		done += w[i].done;
		errors += w[i].errors;
	}
	uint64_t el = now_ns() - t0;
	char extra[128];
	snprintf(extra, sizeof(extra), "\"mode\":\"%s\",\"target_rate\":%lld,\"threads\":%lld,\"rate_per_s\":%.0f", mode,
		 rate, nthreads, done * 1e9 / (double)el);
	report("rate", done, el, errors, extra);
	free(w);
	return 0;
}
