/* tcpstream — byte-exact bidirectional TCP streams, for testing that connections survive a move.
 *
 * Usage:
 *   tcpstream server --listen ADDR:PORT --status FILE [--rate MBPS] [--eof-ok]
 *   tcpstream client --connect ADDR:PORT --status FILE [--rate MBPS] [--conns N] [--eof-ok]
 *                    [--half-close-after BYTES] [--server-half-close-after BYTES] [--shut-after-eof BYTES]
 *
 *   --listen ADDR:PORT   IPv4 address; port 0 picks one (reported as port= in status and ready line)
 *   --rate MBPS          cap on what this side sends, 10^6 bytes/s, shared over its connections
 *                        (default: as fast as the peer reads)
 *   --conns N            client: connections to open (default 1)
 *   --half-close-after B client shuts down its write side after sending B bytes on each connection,
 *                        and keeps reading (server: CLOSE_WAIT, client: FIN_WAIT2)
 *   --server-half-close-after B  the server does the same after sending B bytes (server: FIN_WAIT2,
 *                        client: CLOSE_WAIT)
 *   --shut-after-eof M   a side that got the peer's EOF shuts its own write side after M more bytes
 *                        (default: never — it keeps sending, holding the half-closed state)
 *   --eof-ok             an EOF at any offset is not an error on this side (use with SIGUSR1)
 *   SIGUSR1              shut down the write side of every connection now (both programs)
 * The client sends the half-close settings to the server in its hello, so the server needs none.
 *
 * Streams: after a 32-byte hello (magic, session nonce, connection id, options), each direction of
 * connection c carries byte k = byte (k % 8) of mix(seed + k / 8 * GOLDEN), seed = mix(nonce, c, dir),
 * so the receiver verifies every byte at its offset, whatever the read sizes. Each connection has a
 * sender and a receiver thread; both poll() with a timeout and use MSG_DONTWAIT, so EAGAIN/EINTR are
 * just retried and SIGUSR1/SIGTERM are noticed while the peer is not reading.
 *
 * Errors (counted, first one described in lasterror, the program keeps running and reporting):
 * a mismatched byte (once per read that has one), ECONNRESET / EPIPE / other socket errors (also
 * counted in resets when a reset), an EOF not at the announced offset (unless --eof-ok), a bad hello.
 *
 * Status keys (besides pid tick errors phase): role state=running bytes_sent bytes_received resets
 * max_gap_ms (longest completed interval between two successful reads on any connection; the pause
 * a peer saw) cur_gap_ms (longest current wait on a connection still expecting data) conns (open)
 * accepted (server) eofs (EOFs received) shut_wr (write sides we shut down) closed (connections
 * fully finished) port.
 */
#include "wl.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>

#define GOLDEN 0x9E3779B97F4A7C15ull
#define HELLO_MAGIC 0x314d52545354ull /* "TSTRM1" */
#define CHUNK 65536
#define MAX_CONNS 256

struct hello {
	uint64_t magic;
	uint64_t nonce;
	uint32_t conn;
	uint32_t flags;
	int64_t server_half_close_after; /* -1 = never */
	int64_t client_half_close_after;
	int64_t shut_after_eof;
};

struct conn {
	int fd;
	uint32_t id;
	uint64_t seed_tx, seed_rx;
	int64_t half_close_after; /* our side: shut write after this many bytes, -1 never */
	int64_t peer_half_close_after; /* where the peer's EOF is expected, -1 = not expected */
	int64_t shut_after_eof;
	uint64_t sent, recvd;     /* atomics */
	uint64_t last_read_ns;    /* atomic */
	int eof, shut, rx_done, tx_done; /* atomics */
	uint64_t eof_at_sent;     /* our `sent` when the EOF came */
};

static int is_server;
static double rate_mbps;
static int eof_ok;
static volatile sig_atomic_t shut_now;
static struct conn *conns[MAX_CONNS];
static int nconns; /* atomic */
static uint64_t accepted, resets, eofs, shut_wr, closed, max_gap_ns, open_conns;
static int listen_port;

/* Fill buf with stream bytes [off, off + n). */
static void gen_bytes(uint64_t seed, uint64_t off, uint8_t *buf, size_t n)
{
	size_t i = 0;
	while (i < n) {
		uint64_t w = mix(seed + ((off + i) / 8) * GOLDEN);
		for (unsigned b = (off + i) % 8; b < 8 && i < n; b++, i++) buf[i] = (uint8_t)(w >> (8 * b));
	}
}

/* Offset of the first byte that differs, or -1. */
static int64_t check_bytes(uint64_t seed, uint64_t off, const uint8_t *buf, size_t n)
{
	uint8_t want[CHUNK];
	gen_bytes(seed, off, want, n);
	if (!memcmp(want, buf, n)) return -1;
	for (size_t i = 0; i < n; i++)
		if (want[i] != buf[i]) return (int64_t)(off + i);
	return -1;
}

static void on_usr1(int sig)
{
	(void)sig;
	shut_now = 1;
}

static void sock_error(struct conn *c, const char *what, int err)
{
	if (err == ECONNRESET) __atomic_add_fetch(&resets, 1, __ATOMIC_SEQ_CST);
	wl_error("%s-conn%u errno=%d(%s) sent=%llu received=%llu", what, c->id, err, strerror(err),
		 (unsigned long long)__atomic_load_n(&c->sent, __ATOMIC_SEQ_CST),
		 (unsigned long long)__atomic_load_n(&c->recvd, __ATOMIC_SEQ_CST));
}

static void maybe_close(struct conn *c)
{
	/* The last of the two threads to finish closes the fd. */
	if (__atomic_load_n(&c->rx_done, __ATOMIC_SEQ_CST) && __atomic_load_n(&c->tx_done, __ATOMIC_SEQ_CST)) {
		int fd = __atomic_exchange_n(&c->fd, -1, __ATOMIC_SEQ_CST);
		if (fd >= 0) {
			close(fd);
			__atomic_add_fetch(&closed, 1, __ATOMIC_SEQ_CST);
			__atomic_sub_fetch(&open_conns, 1, __ATOMIC_SEQ_CST);
		}
	}
}

static void do_shut(struct conn *c)
{
	if (__atomic_exchange_n(&c->shut, 1, __ATOMIC_SEQ_CST)) return;
	if (shutdown(c->fd, SHUT_WR) < 0) sock_error(c, "shutdown", errno);
	__atomic_add_fetch(&shut_wr, 1, __ATOMIC_SEQ_CST);
}

static void *sender(void *arg)
{
	struct conn *c = arg;
	uint8_t buf[CHUNK];
	uint64_t t0 = wl_now_ns(), base_sent = 0;
	for (;;) {
		if (wl_term) break;
		uint64_t sent = __atomic_load_n(&c->sent, __ATOMIC_SEQ_CST);
		/* How far we may send: half-close point, or M bytes after the peer's EOF. */
		int64_t limit = -1;
		if (c->half_close_after >= 0) limit = c->half_close_after;
		if (__atomic_load_n(&c->eof, __ATOMIC_SEQ_CST) && c->shut_after_eof >= 0) {
			int64_t l = (int64_t)c->eof_at_sent + c->shut_after_eof;
			if (limit < 0 || l < limit) limit = l;
		}
		if (shut_now || (limit >= 0 && (int64_t)sent >= limit)) {
			do_shut(c);
			break;
		}
		size_t n = CHUNK;
		if (limit >= 0 && (uint64_t)limit - sent < n) n = (size_t)((uint64_t)limit - sent);
		if (rate_mbps > 0) {
			/* Token bucket over the whole run, this connection's share; debt beyond 50 ms is
			 * forgiven so a freeze is not followed by a burst. */
			int k = __atomic_load_n(&nconns, __ATOMIC_SEQ_CST);
			double per_ns = rate_mbps * 1e6 / 1e9 / (k > 0 ? k : 1);
			uint64_t now = wl_now_ns();
			double allowed = per_ns * (double)(now - t0) - (double)(sent - base_sent);
			if (allowed > per_ns * 50e6 + CHUNK) {
				t0 = now, base_sent = sent;
				allowed = per_ns * 50e6 + CHUNK;
			}
			if (allowed < 1) {
				wl_sleep_ms(1);
				continue;
			}
			if ((double)n > allowed) n = (size_t)allowed;
		}
		struct pollfd p = {.fd = c->fd, .events = POLLOUT};
		int pr = poll(&p, 1, 50);
		if (pr <= 0) continue; /* timeout or EINTR: re-check signals and limits */
		gen_bytes(c->seed_tx, sent, buf, n);
		ssize_t w = send(c->fd, buf, n, MSG_DONTWAIT | MSG_NOSIGNAL);
		if (w < 0) {
			if (errno == EAGAIN || errno == EINTR) continue;
			sock_error(c, "send", errno);
			break;
		}
		__atomic_add_fetch(&c->sent, (uint64_t)w, __ATOMIC_SEQ_CST);
	}
	__atomic_store_n(&c->tx_done, 1, __ATOMIC_SEQ_CST);
	maybe_close(c);
	return NULL;
}

static void *receiver(void *arg)
{
	struct conn *c = arg;
	uint8_t buf[CHUNK];
	int mismatched = 0;
	for (;;) {
		if (wl_term) break;
		struct pollfd p = {.fd = c->fd, .events = POLLIN};
		int pr = poll(&p, 1, 100);
		if (pr <= 0) continue;
		ssize_t r = recv(c->fd, buf, sizeof buf, MSG_DONTWAIT);
		if (r < 0) {
			if (errno == EAGAIN || errno == EINTR) continue;
			sock_error(c, "recv", errno);
			break;
		}
		uint64_t now = wl_now_ns(), last = __atomic_exchange_n(&c->last_read_ns, now, __ATOMIC_SEQ_CST);
		uint64_t gap = now - last, m = __atomic_load_n(&max_gap_ns, __ATOMIC_SEQ_CST);
		while (gap > m && !__atomic_compare_exchange_n(&max_gap_ns, &m, gap, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {}
		uint64_t off = __atomic_load_n(&c->recvd, __ATOMIC_SEQ_CST);
		if (r == 0) {
			c->eof_at_sent = __atomic_load_n(&c->sent, __ATOMIC_SEQ_CST);
			__atomic_store_n(&c->eof, 1, __ATOMIC_SEQ_CST);
			__atomic_add_fetch(&eofs, 1, __ATOMIC_SEQ_CST);
			/* Expected: at the offset the hello announced, or (peer answers our FIN with its own
			 * after M bytes) any time after we shut down our write side. */
			int expected = (c->peer_half_close_after >= 0 && (uint64_t)c->peer_half_close_after == off) ||
				       (c->shut_after_eof >= 0 && __atomic_load_n(&c->shut, __ATOMIC_SEQ_CST));
			if (!eof_ok && !expected)
				wl_error("unexpected-eof-conn%u at=%llu expected=%lld", c->id, (unsigned long long)off,
					 (long long)c->peer_half_close_after);
			break;
		}
		int64_t bad = check_bytes(c->seed_rx, off, buf, (size_t)r);
		if (bad >= 0 && !mismatched) {
			/* One error per connection: after a slip every later byte differs too. */
			mismatched = 1;
			wl_error("byte-mismatch-conn%u offset=%lld", c->id, (long long)bad);
		}
		__atomic_add_fetch(&c->recvd, (uint64_t)r, __ATOMIC_SEQ_CST);
	}
	__atomic_store_n(&c->rx_done, 1, __ATOMIC_SEQ_CST);
	maybe_close(c);
	return NULL;
}

static int parse_addr(const char *s, struct sockaddr_in *a)
{
	char host[64];
	const char *colon = strrchr(s, ':');
	if (!colon || (size_t)(colon - s) >= sizeof host) return -1;
	memcpy(host, s, colon - s);
	host[colon - s] = 0;
	memset(a, 0, sizeof *a);
	a->sin_family = AF_INET;
	a->sin_port = htons((uint16_t)atoi(colon + 1));
	return inet_pton(AF_INET, host, &a->sin_addr) == 1 ? 0 : -1;
}

static int read_full(int fd, void *buf, size_t n)
{
	size_t got = 0;
	while (got < n) {
		ssize_t r = recv(fd, (char *)buf + got, n - got, 0);
		if (r < 0 && errno == EINTR) continue;
		if (r <= 0) return -1;
		got += (size_t)r;
	}
	return 0;
}

static void start_conn(struct conn *c)
{
	int one = 1;
	setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	c->last_read_ns = wl_now_ns();
	int slot = __atomic_fetch_add(&nconns, 1, __ATOMIC_SEQ_CST);
	if (slot >= MAX_CONNS) {
		wl_error("too-many-connections");
		close(c->fd);
		return;
	}
	conns[slot] = c;
	__atomic_add_fetch(&open_conns, 1, __ATOMIC_SEQ_CST);
	/* SIGTERM stays with main (see main); SIGUSR1 is only a flag, any thread may take it. */
	pthread_t t;
	if (pthread_create(&t, NULL, sender, c) || pthread_create(&t, NULL, receiver, c)) {
		fprintf(stderr, "tcpstream: pthread_create failed\n");
		exit(2);
	}
	pthread_detach(t);
}

static void *acceptor(void *arg)
{
	int lfd = *(int *)arg;
	for (;;) {
		int fd = accept(lfd, NULL, NULL);
		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED) continue;
			wl_error("accept errno=%d(%s)", errno, strerror(errno));
			wl_sleep_ms(100);
			continue;
		}
		struct hello h;
		if (read_full(fd, &h, sizeof h) || h.magic != HELLO_MAGIC) {
			wl_error("bad-hello");
			close(fd);
			continue;
		}
		__atomic_add_fetch(&accepted, 1, __ATOMIC_SEQ_CST);
		struct conn *c = calloc(1, sizeof *c);
		c->fd = fd;
		c->id = h.conn;
		c->seed_rx = mix(h.nonce ^ ((uint64_t)h.conn << 1));
		c->seed_tx = mix(h.nonce ^ ((uint64_t)h.conn << 1) ^ 1);
		c->half_close_after = h.server_half_close_after;
		c->peer_half_close_after = h.client_half_close_after;
		c->shut_after_eof = h.shut_after_eof;
		start_conn(c);
	}
	return NULL;
}

static void usage(void)
{
	fprintf(stderr, "usage: tcpstream server --listen ADDR:PORT --status FILE [--rate MBPS] [--eof-ok]\n"
			"       tcpstream client --connect ADDR:PORT --status FILE [--rate MBPS] [--conns N] [--eof-ok]\n"
			"                 [--half-close-after B] [--server-half-close-after B] [--shut-after-eof M]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	if (argc < 2) usage();
	if (!strcmp(argv[1], "server")) is_server = 1;
	else if (strcmp(argv[1], "client")) usage();
	wl_init(argc, argv);
	const char *addr = NULL;
	int nc = 1;
	int64_t half = -1, server_half = -1, shut_after = -1;
	for (int i = 2; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
		if (!strcmp(a, "--status") && v) i++;
		else if (!strcmp(a, "--listen") && v && is_server) addr = v, i++;
		else if (!strcmp(a, "--connect") && v && !is_server) addr = v, i++;
		else if (!strcmp(a, "--rate") && v) rate_mbps = strtod(v, NULL), i++;
		else if (!strcmp(a, "--conns") && v && !is_server) nc = atoi(v), i++;
		else if (!strcmp(a, "--half-close-after") && v && !is_server) half = strtoll(v, NULL, 0), i++;
		else if (!strcmp(a, "--server-half-close-after") && v && !is_server) server_half = strtoll(v, NULL, 0), i++;
		else if (!strcmp(a, "--shut-after-eof") && v && !is_server) shut_after = strtoll(v, NULL, 0), i++;
		else if (!strcmp(a, "--eof-ok")) eof_ok = 1;
		else {
			fprintf(stderr, "tcpstream: unknown or misplaced argument %s\n", a);
			usage();
		}
	}
	struct sockaddr_in sa;
	if (!addr || parse_addr(addr, &sa) || nc < 1 || nc > MAX_CONNS) usage();

	struct sigaction act;
	memset(&act, 0, sizeof act);
	act.sa_handler = on_usr1;
	sigaction(SIGUSR1, &act, NULL);
	/* Worker threads never take SIGTERM (main handles it); they inherit this mask. */
	sigset_t term, old;
	sigemptyset(&term);
	sigaddset(&term, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &term, &old);

	static int lfd;
	if (is_server) {
		lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		int one = 1;
		setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
		socklen_t len = sizeof sa;
		if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof sa) || listen(lfd, 64) ||
		    getsockname(lfd, (struct sockaddr *)&sa, &len)) {
			perror("tcpstream: listen");
			return 2;
		}
		listen_port = ntohs(sa.sin_port);
		pthread_t t;
		if (pthread_create(&t, NULL, acceptor, &lfd)) return 2;
	} else {
		struct hello h = {.magic = HELLO_MAGIC,
				  .nonce = mix(wl_now_ns() ^ ((uint64_t)getpid() << 20)),
				  .server_half_close_after = server_half,
				  .client_half_close_after = half,
				  .shut_after_eof = shut_after};
		for (int i = 0; i < nc; i++) {
			int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
			if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa)) {
				perror("tcpstream: connect");
				return 2;
			}
			h.conn = (uint32_t)i;
			if (send(fd, &h, sizeof h, MSG_NOSIGNAL) != (ssize_t)sizeof h) {
				perror("tcpstream: hello");
				return 2;
			}
			struct conn *c = calloc(1, sizeof *c);
			c->fd = fd;
			c->id = (uint32_t)i;
			c->seed_tx = mix(h.nonce ^ ((uint64_t)i << 1));
			c->seed_rx = mix(h.nonce ^ ((uint64_t)i << 1) ^ 1);
			c->half_close_after = half;
			c->peer_half_close_after = server_half;
			c->shut_after_eof = shut_after;
			start_conn(c);
		}
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);

	char extra[1024];
	int ready = 0;
	for (uint64_t tick = 0;; tick++) {
		uint64_t sent = 0, recvd = 0, now = wl_now_ns(), cur_gap = 0;
		int n = __atomic_load_n(&nconns, __ATOMIC_SEQ_CST);
		for (int i = 0; i < n && i < MAX_CONNS; i++) {
			struct conn *c = conns[i];
			if (!c) continue;
			sent += __atomic_load_n(&c->sent, __ATOMIC_SEQ_CST);
			recvd += __atomic_load_n(&c->recvd, __ATOMIC_SEQ_CST);
			if (!__atomic_load_n(&c->rx_done, __ATOMIC_SEQ_CST)) {
				uint64_t g = now - __atomic_load_n(&c->last_read_ns, __ATOMIC_SEQ_CST);
				if (g > cur_gap && g < now) cur_gap = g;
			}
		}
		extra[0] = 0;
		wl_append(extra, sizeof extra,
			  "role=%s state=running bytes_sent=%llu bytes_received=%llu resets=%llu max_gap_ms=%.1f cur_gap_ms=%.1f conns=%llu accepted=%llu eofs=%llu shut_wr=%llu closed=%llu port=%d",
			  is_server ? "server" : "client", (unsigned long long)sent, (unsigned long long)recvd,
			  (unsigned long long)__atomic_load_n(&resets, __ATOMIC_SEQ_CST),
			  (double)__atomic_load_n(&max_gap_ns, __ATOMIC_SEQ_CST) / 1e6, (double)cur_gap / 1e6,
			  (unsigned long long)__atomic_load_n(&open_conns, __ATOMIC_SEQ_CST),
			  (unsigned long long)__atomic_load_n(&accepted, __ATOMIC_SEQ_CST),
			  (unsigned long long)__atomic_load_n(&eofs, __ATOMIC_SEQ_CST),
			  (unsigned long long)__atomic_load_n(&shut_wr, __ATOMIC_SEQ_CST),
			  (unsigned long long)__atomic_load_n(&closed, __ATOMIC_SEQ_CST), listen_port);
		if (wl_term) wl_exit(tick, extra);
		wl_write_status("running", tick, extra);
		if (!ready) {
			char r[64];
			snprintf(r, sizeof r, "port=%d", listen_port);
			wl_ready(is_server ? r : "");
			ready = 1;
		}
		wl_sleep_ms(50);
	}
}
