/* memcheck — anonymous memory with a verifiable pattern + worker threads blocked in syscalls.
 *
 * Usage: memcheck --status FILE [--mib N] [--threads LIST] [--strict-eintr]
 *   --mib N        size of the anonymous region (default 64)
 *   --threads LIST comma-separated subset of epoll,read,sleep,futex (default all; "none" for none)
 *   --strict-eintr count an EINTR from epoll_wait as an error. By default it is only counted in
 *                  key epoll_eintr and retried: Linux returns EINTR from epoll_wait (no restart)
 *                  when the task is stopped by SIGSTOP and resumed, or interrupted by ptrace
 *                  (PTRACE_INTERRUPT / attach), even with no signal handler — see signal(7),
 *                  "Interruption of system calls and library functions by stop signals".
 *
 * Memory: page i holds 512 64-bit words, word j = mix(i, gen[i]) + j * GOLDEN. Every ~10 ms main
 * verifies-then-rewrites 8 pages (gen[i]++) and verifies a rotating slice of 1/100 of the region
 * (whole region verified at least every ~1-2 s).
 *
 * Workers (main only sends the next event after the worker acknowledged the previous one, so every
 * wakeup has exactly one expected result):
 *   epoll  epoll_wait(-1) on an eventfd; main writes k; expects 1 event, data.u64 tag, read()==k
 *   read   blocking read() of 8 bytes from a pipe; main writes sequence number k
 *   sleep  clock_nanosleep(CLOCK_MONOTONIC, 300 ms); expects 0 and elapsed >= 300 ms
 *   futex  FUTEX_WAIT (no timeout) on a word main bumps + FUTEX_WAKEs; expects value k
 * Every thread checks its __thread variable each wakeup. A worker is "stalled" when main has ticked
 * more than STALL_TICKS times (main ticks only while it runs, so SIGSTOP/freeze is tolerated) since
 * the worker's last wakeup while an event for it was pending.
 *
 * Status keys: tick errors phase mib region pages verified_pages sweeps rewrites
 *              epoll_wakeups read_wakeups sleeps futex_wakeups futex_spurious epoll_eintr threads
 */
#include "wl.h"
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>

#define PAGE 4096
#define WORDS (PAGE / 8)
#define GOLDEN 0x9E3779B97F4A7C15ull
#define EPOLL_TAG 0x7e4e0e9011da7aull
#define STALL_TICKS 500 /* ~5 s of main running */
#define REWRITES_PER_TICK 8

static uint64_t *region;
static uint32_t *gen;
static size_t npages;
static __thread uint64_t tls_val;

enum { W_EPOLL, W_READ, W_SLEEP, W_FUTEX, NW };
static const char *wname[NW] = {"epoll", "read", "sleep", "futex"};
static int wenabled[NW];
static uint64_t wcount[NW];          /* wakeups, written by worker (atomic) */
static uint64_t wsent[NW];           /* events sent by main */
static uint64_t wlast_count[NW];     /* main's view: count at last check */
static uint64_t wlast_tick[NW];      /* main tick when count last advanced */
static int wstalled[NW];
static uint64_t futex_spurious, epoll_eintr;
static int strict_eintr;

static int efd, epfd, pipefd[2];
static uint32_t futex_word;

static inline uint64_t mix(uint64_t x)
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ull;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebull;
	x ^= x >> 31;
	return x;
}

static inline uint64_t page_seed(size_t i) { return mix(((uint64_t)i << 32) ^ gen[i] ^ 0x5eed); }

static void fill_page(size_t i)
{
	uint64_t s = page_seed(i), *p = region + i * WORDS;
	for (size_t j = 0; j < WORDS; j++) p[j] = s + j * GOLDEN;
}

static int check_page(size_t i)
{
	uint64_t s = page_seed(i), *p = region + i * WORDS, bad = 0;
	for (size_t j = 0; j < WORDS; j++) bad |= p[j] ^ (s + j * GOLDEN);
	if (!bad) return 0;
	for (size_t j = 0; j < WORDS; j++)
		if (p[j] != s + j * GOLDEN) {
			wl_error("memory-mismatch page=%zu addr=%p gen=%u got=0x%llx want=0x%llx", i,
				 (void *)(p + j), gen[i], (unsigned long long)p[j],
				 (unsigned long long)(s + j * GOLDEN));
			break;
		}
	return 1;
}

static void check_tls(uint64_t want, const char *who)
{
	if (tls_val != want)
		wl_error("tls-mismatch-%s got=0x%llx want=0x%llx", who, (unsigned long long)tls_val,
			 (unsigned long long)want);
}

static void ack(int w) { __atomic_add_fetch(&wcount[w], 1, __ATOMIC_SEQ_CST); }

static void *epoll_thread(void *arg)
{
	(void)arg;
	const uint64_t me = 0x11110000ull + W_EPOLL;
	tls_val = me;
	for (uint64_t k = 1;; k++) {
		struct epoll_event ev[4];
		int n = epoll_wait(epfd, ev, 4, -1);
		if (n < 0 && errno == EINTR && !strict_eintr) {
			/* Linux returns EINTR from epoll_wait after a stop signal/SIGCONT or a ptrace
			 * interrupt even with no handler (signal(7)); tolerated unless --strict-eintr. */
			__atomic_add_fetch(&epoll_eintr, 1, __ATOMIC_SEQ_CST);
			k--;
			continue;
		}
		if (n != 1) {
			wl_error("epoll_wait-returned-%d errno=%d(%s) k=%llu", n, n < 0 ? errno : 0,
				 n < 0 ? strerror(errno) : "-", (unsigned long long)k);
			if (n < 0) {
				k--;
				continue;
			}
		}
		if (ev[0].data.u64 != EPOLL_TAG || !(ev[0].events & EPOLLIN))
			wl_error("epoll-bad-event data=0x%llx events=0x%x", (unsigned long long)ev[0].data.u64,
				 ev[0].events);
		uint64_t v = 0;
		ssize_t r = read(efd, &v, 8);
		if (r != 8 || v != k)
			wl_error("eventfd-read r=%zd errno=%d v=%llu want=%llu", r, r < 0 ? errno : 0,
				 (unsigned long long)v, (unsigned long long)k);
		check_tls(me, "epoll");
		ack(W_EPOLL);
	}
	return NULL;
}

static void *read_thread(void *arg)
{
	(void)arg;
	const uint64_t me = 0x11110000ull + W_READ;
	tls_val = me;
	for (uint64_t k = 1;; k++) {
		uint64_t v = 0;
		ssize_t r = read(pipefd[0], &v, 8);
		if (r != 8 || v != k)
			wl_error("pipe-read r=%zd errno=%d(%s) v=%llu want=%llu", r, r < 0 ? errno : 0,
				 r < 0 ? strerror(errno) : "-", (unsigned long long)v, (unsigned long long)k);
		check_tls(me, "read");
		ack(W_READ);
	}
	return NULL;
}

static void *sleep_thread(void *arg)
{
	(void)arg;
	const uint64_t me = 0x11110000ull + W_SLEEP;
	tls_val = me;
	for (;;) {
		struct timespec req = {0, 300 * 1000000L};
		uint64_t t0 = wl_now_ns();
		int r = clock_nanosleep(CLOCK_MONOTONIC, 0, &req, NULL);
		uint64_t el = wl_now_ns() - t0;
		if (r != 0) wl_error("clock_nanosleep-returned-%d(%s)", r, strerror(r));
		else if (el < 300 * 1000000ull) wl_error("sleep-too-short elapsed_ns=%llu", (unsigned long long)el);
		check_tls(me, "sleep");
		ack(W_SLEEP);
	}
	return NULL;
}

static long futex(uint32_t *w, int op, uint32_t val)
{
	return syscall(SYS_futex, w, op, val, NULL, NULL, 0);
}

static void *futex_thread(void *arg)
{
	(void)arg;
	const uint64_t me = 0x11110000ull + W_FUTEX;
	tls_val = me;
	for (uint32_t last = 0;; last++) {
		while (__atomic_load_n(&futex_word, __ATOMIC_SEQ_CST) == last) {
			long r = futex(&futex_word, FUTEX_WAIT_PRIVATE, last);
			if (r == -1 && errno != EAGAIN)
				wl_error("futex_wait-returned-%ld errno=%d(%s)", r, errno, strerror(errno));
			else if (r == 0 && __atomic_load_n(&futex_word, __ATOMIC_SEQ_CST) == last)
				__atomic_add_fetch(&futex_spurious, 1, __ATOMIC_SEQ_CST); /* stale wake: legal */
		}
		uint32_t v = __atomic_load_n(&futex_word, __ATOMIC_SEQ_CST);
		if (v != last + 1) wl_error("futex-value got=%u want=%u", v, last + 1);
		check_tls(me, "futex");
		ack(W_FUTEX);
	}
	return NULL;
}

static void parse_threads(const char *s)
{
	if (!strcmp(s, "none")) return;
	char buf[256];
	snprintf(buf, sizeof buf, "%s", s);
	for (char *save, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
		int found = 0;
		for (int w = 0; w < NW; w++)
			if (!strcmp(t, wname[w])) wenabled[w] = found = 1;
		if (!found) {
			fprintf(stderr, "memcheck: unknown thread kind '%s' (epoll,read,sleep,futex,none)\n", t);
			exit(2);
		}
	}
}

static void send_events(void)
{
	for (int w = 0; w < NW; w++) {
		if (!wenabled[w] || w == W_SLEEP) continue;
		if (__atomic_load_n(&wcount[w], __ATOMIC_SEQ_CST) != wsent[w]) continue; /* not acked yet */
		uint64_t k = wsent[w] + 1;
		ssize_t r = 8;
		if (w == W_EPOLL) r = write(efd, &k, 8);
		else if (w == W_READ) r = write(pipefd[1], &k, 8);
		else if (w == W_FUTEX) {
			__atomic_store_n(&futex_word, (uint32_t)k, __ATOMIC_SEQ_CST);
			if (futex(&futex_word, FUTEX_WAKE_PRIVATE, 1) < 0) r = -1;
		}
		if (r != 8) wl_error("main-send-%s r=%zd errno=%d", wname[w], r, errno);
		wsent[w] = k;
	}
}

static void check_stalls(uint64_t tick)
{
	for (int w = 0; w < NW; w++) {
		if (!wenabled[w]) continue;
		uint64_t c = __atomic_load_n(&wcount[w], __ATOMIC_SEQ_CST);
		int pending = w == W_SLEEP || c != wsent[w];
		if (c != wlast_count[w] || !pending) {
			wlast_count[w] = c;
			wlast_tick[w] = tick;
			continue;
		}
		if (tick - wlast_tick[w] > STALL_TICKS && !wstalled[w]) {
			wstalled[w] = 1;
			wl_error("stalled-%s wakeups=%llu main_ticks_since=%llu", wname[w], (unsigned long long)c,
				 (unsigned long long)(tick - wlast_tick[w]));
		}
	}
}

int main(int argc, char **argv)
{
	size_t mib = 64;
	int threads_given = 0;
	wl_init(argc, argv);
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--status")) i++;
		else if (!strcmp(argv[i], "--mib") && i + 1 < argc) mib = strtoul(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--strict-eintr")) strict_eintr = 1;
		else if (!strcmp(argv[i], "--threads") && i + 1 < argc) parse_threads(argv[++i]), threads_given = 1;
		else {
			fprintf(stderr, "memcheck: unknown argument %s\n", argv[i]);
			return 2;
		}
	}
	if (!threads_given)
		for (int w = 0; w < NW; w++) wenabled[w] = 1;
	if (!mib) mib = 1;
	npages = mib * 256;
	region = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	gen = calloc(npages, sizeof *gen);
	if (region == MAP_FAILED || !gen) {
		perror("memcheck: mmap");
		return 2;
	}
	for (size_t i = 0; i < npages; i++) fill_page(i);
	tls_val = 0x1111ffffull;

	efd = eventfd(0, EFD_CLOEXEC);
	epfd = epoll_create1(EPOLL_CLOEXEC);
	struct epoll_event ev = {.events = EPOLLIN, .data.u64 = EPOLL_TAG};
	if (efd < 0 || epfd < 0 || epoll_ctl(epfd, EPOLL_CTL_ADD, efd, &ev) || pipe2(pipefd, O_CLOEXEC)) {
		perror("memcheck: setup");
		return 2;
	}

	/* Workers never see SIGTERM (it would EINTR their syscalls); main handles it. */
	sigset_t term, old;
	sigemptyset(&term);
	sigaddset(&term, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &term, &old);
	void *(*fn[NW])(void *) = {epoll_thread, read_thread, sleep_thread, futex_thread};
	for (int w = 0; w < NW; w++) {
		pthread_t t;
		if (wenabled[w] && pthread_create(&t, NULL, fn[w], NULL)) {
			fprintf(stderr, "memcheck: pthread_create failed\n");
			return 2;
		}
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);

	uint64_t tick = 0, verified = 0, sweeps = 0, rewrites = 0, last_status = 0;
	size_t cursor = 0, slice = npages / 100 + 1, rng = 12345;
	char extra[1024], thr[64] = "";
	for (int w = 0; w < NW; w++)
		if (wenabled[w]) wl_append(thr, sizeof thr, "%s%s", *thr ? "," : "", wname[w]);
	if (!*thr) strcpy(thr, "none");
	int ready = 0;
	for (;;) {
		/* rewrite a few pages (verify first) */
		for (int r = 0; r < REWRITES_PER_TICK; r++) {
			rng = mix(rng + tick + r);
			size_t i = rng % npages;
			check_page(i);
			gen[i]++;
			fill_page(i);
			rewrites++;
		}
		/* verify a rotating slice */
		for (size_t n = 0; n < slice; n++) {
			check_page(cursor);
			verified++;
			if (++cursor == npages) cursor = 0, sweeps++;
		}
		check_tls(0x1111ffffull, "main");
		if (tick % 20 == 0) send_events(); /* every ~200 ms */
		check_stalls(tick);
		tick++;

		uint64_t now = wl_now_ns();
		if (wl_term || !ready || now - last_status >= 50 * 1000000ull) {
			extra[0] = 0;
			wl_append(extra, sizeof extra,
				  "mib=%zu region=%p pages=%zu verified_pages=%llu sweeps=%llu rewrites=%llu threads=%s",
				  mib, (void *)region, npages, (unsigned long long)verified,
				  (unsigned long long)sweeps, (unsigned long long)rewrites, thr);
			wl_append(extra, sizeof extra,
				  " epoll_wakeups=%llu read_wakeups=%llu sleeps=%llu futex_wakeups=%llu futex_spurious=%llu epoll_eintr=%llu",
				  (unsigned long long)__atomic_load_n(&wcount[W_EPOLL], __ATOMIC_SEQ_CST),
				  (unsigned long long)__atomic_load_n(&wcount[W_READ], __ATOMIC_SEQ_CST),
				  (unsigned long long)__atomic_load_n(&wcount[W_SLEEP], __ATOMIC_SEQ_CST),
				  (unsigned long long)__atomic_load_n(&wcount[W_FUTEX], __ATOMIC_SEQ_CST),
				  (unsigned long long)__atomic_load_n(&futex_spurious, __ATOMIC_SEQ_CST),
				  (unsigned long long)__atomic_load_n(&epoll_eintr, __ATOMIC_SEQ_CST));
			if (wl_term) wl_exit(tick, extra);
			wl_write_status("running", tick, extra);
			last_status = now;
			if (!ready) {
				char r[64];
				snprintf(r, sizeof r, "region=%p mib=%zu", (void *)region, mib);
				wl_ready(r);
				ready = 1;
			}
		}
		wl_sleep_ms(10);
	}
}
