/* bulk loopback TCP transfer: one connection, MEGABYTES written in 128 KiB chunks to a reader
 * thread that discards them; the clock stops when the reader has seen EOF.
 * usage: bulk_tcp MEGABYTES */
#include "net.h"

static long long received;

static void *sink(void *arg)
{
	int lfd = *(int *)arg;
	int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
	if (c < 0)
		die("accept");
	static char buf[1 << 18];
	for (;;) {
		ssize_t r = read(c, buf, sizeof(buf));
		if (r > 0)
			received += r;
		else if (r == 0 || errno != EINTR)
			break;
	}
	close(c);
	return NULL;
}

int main(int argc, char **argv)
{
	long long mb = arg_ll(argc, argv, 1, 64);
	bench_setup();
	struct sockaddr_in addr;
	int lfd = listen_loopback(&addr);
	pthread_t th;
	pthread_create(&th, NULL, sink, &lfd);
	static char buf[1 << 17];
	memset(buf, 'x', sizeof(buf));
	long long total = mb << 20;
	uint64_t t0 = start_timing();
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		die("connect");
	for (long long sent = 0; sent < total;) {
		size_t want = total - sent < (long long)sizeof(buf) ? (size_t)(total - sent) : sizeof(buf);
		ssize_t w = write(fd, buf, want);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			die("write");
		}
		sent += w;
	}
	shutdown(fd, SHUT_WR);
	pthread_join(th, NULL);
	uint64_t el = now_ns() - t0;
	close(fd);
	char extra[64];
	snprintf(extra, sizeof(extra), "\"bytes\":%lld", received);
	report("bulk_tcp", 1, el, received != total, extra);
	return 0;
}
