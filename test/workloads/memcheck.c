/* memcheck — anonymous memory with a verifiable pattern + worker threads blocked in syscalls.
 *
 * Usage: memcheck --status FILE [--mib N] [--threads LIST] [--strict-eintr] [--write-rate MBPS]
 *   --mib N        size of the anonymous region (default 64)
 *   --threads LIST comma-separated subset of epoll,read,sleep,futex (default all; "none" for none)
 *   --strict-eintr count an EINTR from epoll_wait as an error. By default it is only counted in
 *                  key epoll_eintr and retried: Linux returns EINTR from epoll_wait (no restart)
 *                  when the task is stopped by SIGSTOP and resumed, or interrupted by ptrace
 *                  (PTRACE_INTERRUPT / attach), even with no signal handler — see signal(7),
 *                  "Interruption of system calls and library functions by stop signals".
 *
 *   --write-rate MBPS  a writer thread dirties the region at MBPS (10^6 bytes/s, whole 4 KiB pages,
 *                  spread over the region by a prime stride) while a verifier thread sweeps it
 *                  continuously (see "Write-rate mode" below). Without it, the behaviour below.
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
 * Write-rate mode (--write-rate): every page describes itself, seqlock style:
 *   word 0  2*gen while stable, 2*gen-1 while the writer is rewriting it
 *   word 1  page index ^ INDEX_MAGIC
 *   word j  mix(index, gen) + j * GOLDEN (j >= 2)
 * and gen[i] (a separate array, also in the process's memory) holds the generation the writer last
 * completed. The verifier reads gen[i], then the page (skipping it if the header is odd or changes
 * under it), then gen[i] again, and requires gen_before <= page_gen <= gen_after + 1: a page that is
 * self-consistent but OLDER than the writer's record (a dirty page a migration failed to resend) is
 * caught, not only a torn or foreign one. The writer owes rate*elapsed pages, tops up in 1 ms slots
 * (clock_nanosleep TIMER_ABSTIME) and forgives debt older than 20 ms, so a freeze or throttle is not
 * followed by a burst. Main then does only events, stall checks and status.
 *
 * Status keys: tick errors phase mib region pages verified_pages sweeps rewrites
 *              epoll_wakeups read_wakeups sleeps futex_wakeups futex_spurious epoll_eintr threads
 *              + with --write-rate: write_rate write_mbps write_mbps_avg pages_written verify_skips
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


/* ---- write-rate mode ---------------------------------------------------------------------- */
#define INDEX_MAGIC 0x1d3a5b7c9e0f2468ull
static double write_rate;           /* MB/s (10^6 bytes); 0 = mode off */
static uint64_t pages_written;      /* writer (atomic) */
static uint64_t rate_verified, rate_sweeps, verify_skips; /* verifier (atomic) */

static inline uint64_t rate_seed(size_t i, uint64_t g) { return mix(((uint64_t)i << 32) ^ g ^ 0xa11ce); }

static void rate_fill(size_t i, uint64_t g)
{
	uint64_t *p = region + i * WORDS, s = rate_seed(i, g);
	for (size_t j = 2; j < WORDS; j++) p[j] = s + j * GOLDEN;
	p[1] = i ^ INDEX_MAGIC;
}

/* Writer side of the page seqlock: odd header, body, even header, then the record. */
static void rate_write(size_t i)
{
	uint64_t *p = region + i * WORDS;
	uint32_t g = __atomic_load_n(&gen[i], __ATOMIC_RELAXED) + 1;
	__atomic_store_n(&p[0], 2 * (uint64_t)g - 1, __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_RELEASE);
	rate_fill(i, g);
	__atomic_store_n(&p[0], 2 * (uint64_t)g, __ATOMIC_RELEASE);
	__atomic_store_n(&gen[i], g, __ATOMIC_RELEASE);
}

/* 0 = verified, 1 = skipped (being written), -1 = error recorded. */
static int rate_check(size_t i)
{
	uint64_t *p = region + i * WORDS;
	uint32_t before = __atomic_load_n(&gen[i], __ATOMIC_ACQUIRE);
	uint64_t h1 = __atomic_load_n(&p[0], __ATOMIC_ACQUIRE);
	if (h1 & 1) return 1;
	uint64_t g = h1 / 2, s = rate_seed(i, g), bad = p[1] ^ (i ^ INDEX_MAGIC);
	size_t badj = bad ? 1 : 0;
	for (size_t j = 2; j < WORDS; j++) {
		uint64_t d = p[j] ^ (s + j * GOLDEN);
		if (d && !badj) badj = j;
		bad |= d;
	}
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
	uint64_t h2 = __atomic_load_n(&p[0], __ATOMIC_RELAXED);
	uint32_t after = __atomic_load_n(&gen[i], __ATOMIC_ACQUIRE);
	if (h1 != h2) return 1; /* rewritten while we read it */
	if (bad) {
		wl_error("memory-mismatch page=%zu addr=%p gen=%llu word=%zu got=0x%llx", i, (void *)(p + badj),
			 (unsigned long long)g, badj, (unsigned long long)p[badj]);
		return -1;
	}
	if (g < before || g > (uint64_t)after + 1) {
		wl_error("stale-page page=%zu page_gen=%llu recorded_gen=%u..%u", i, (unsigned long long)g, before, after);
		return -1;
	}
	return 0;
}

static void *writer_thread(void *arg)
{
	(void)arg;
	const uint64_t me = 0x11110000ull + 0x10;
	tls_val = me;
	/* A stride coprime with npages visits every page once per npages writes, far apart. */
	size_t stride = npages > 7 ? (size_t)(npages * 0.618) | 1 : 1;
	while (stride > 1) {
		size_t a = stride, b = npages;
		while (b) { size_t t = a % b; a = b; b = t; }
		if (a == 1) break;
		stride += 2;
	}
	const double pages_per_ns = write_rate * 1e6 / PAGE / 1e9;
	const uint64_t slot = 1000000; /* 1 ms */
	const double max_debt = pages_per_ns * 20e6 + 1; /* forgive debt beyond 20 ms */
	size_t cursor = 0;
	uint64_t t0 = wl_now_ns(), done = 0;
	struct timespec next;
	clock_gettime(CLOCK_MONOTONIC, &next);
	for (;;) {
		uint64_t now = wl_now_ns();
		double owed = pages_per_ns * (double)(now - t0) - (double)done;
		if (owed > max_debt) {
			t0 = now - (uint64_t)(((double)done + max_debt) / pages_per_ns);
			owed = max_debt;
		}
		for (; owed >= 1; owed -= 1) {
			rate_write(cursor);
			cursor += stride;
			if (cursor >= npages) cursor -= npages;
			done++;
			__atomic_store_n(&pages_written, done, __ATOMIC_RELAXED);
		}
		check_tls(me, "writer");
		next.tv_nsec += slot;
		if (next.tv_nsec >= 1000000000L) next.tv_sec++, next.tv_nsec -= 1000000000L;
		/* After a long stop, do not chase missed slots one by one. */
		struct timespec cur;
		clock_gettime(CLOCK_MONOTONIC, &cur);
		if (cur.tv_sec > next.tv_sec + 1) next = cur;
		while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR) {}
	}
	return NULL;
}

static void *verifier_thread(void *arg)
{
	(void)arg;
	const uint64_t me = 0x11110000ull + 0x11;
	tls_val = me;
	for (;;) {
		for (size_t i = 0; i < npages; i++) {
			int r = rate_check(i);
			if (r == 1) {
				/* Being written: look again once the writer is past it. */
				__atomic_add_fetch(&verify_skips, 1, __ATOMIC_RELAXED);
				for (int k = 0; k < 100 && (r = rate_check(i)) == 1; k++) sched_yield();
			}
			__atomic_add_fetch(&rate_verified, 1, __ATOMIC_RELAXED);
			/* Pace: ~1 ms rest per 4 MiB verified, so the verifier leaves CPU to the rest. */
			if ((i & 1023) == 1023) wl_sleep_ms(1);
		}
		__atomic_add_fetch(&rate_sweeps, 1, __ATOMIC_RELAXED);
		check_tls(me, "verifier");
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
		else if (!strcmp(argv[i], "--write-rate") && i + 1 < argc) {
			write_rate = strtod(argv[++i], NULL);
			if (!(write_rate > 0)) {
				fprintf(stderr, "memcheck: --write-rate needs a positive MB/s\n");
				return 2;
			}
		}
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
	for (size_t i = 0; i < npages; i++) {
		if (write_rate > 0) {
			gen[i] = 1;
			region[i * WORDS] = 2;
			rate_fill(i, 1);
		} else
			fill_page(i);
	}
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
	if (write_rate > 0) {
		pthread_t t;
		if (pthread_create(&t, NULL, writer_thread, NULL) || pthread_create(&t, NULL, verifier_thread, NULL)) {
			fprintf(stderr, "memcheck: pthread_create failed\n");
			return 2;
		}
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);

	uint64_t tick = 0, verified = 0, sweeps = 0, rewrites = 0, last_status = 0;
	size_t cursor = 0, slice = npages / 100 + 1, rng = 12345;
	char extra[1400], thr[64] = "";
	/* write_mbps over the last ~1 s: a ring of (time, pages_written) samples taken at status writes. */
	enum { HIST = 32 };
	uint64_t hist_t[HIST], hist_p[HIST];
	unsigned hist_n = 0;
	uint64_t rate_t0 = wl_now_ns(), last_written = 0, written_tick = 0, last_verified = 0, verified_tick = 0;
	int writer_stalled = 0, verifier_stalled = 0;
	for (int w = 0; w < NW; w++)
		if (wenabled[w]) wl_append(thr, sizeof thr, "%s%s", *thr ? "," : "", wname[w]);
	if (!*thr) strcpy(thr, "none");
	int ready = 0;
	for (;;) {
		/* rewrite a few pages (verify first); in write-rate mode the writer/verifier threads do it */
		for (int r = 0; r < REWRITES_PER_TICK && write_rate <= 0; r++) {
			rng = mix(rng + tick + r);
			size_t i = rng % npages;
			check_page(i);
			gen[i]++;
			fill_page(i);
			rewrites++;
		}
		/* verify a rotating slice */
		for (size_t n = 0; n < slice && write_rate <= 0; n++) {
			check_page(cursor);
			verified++;
			if (++cursor == npages) cursor = 0, sweeps++;
		}
		check_tls(0x1111ffffull, "main");
		if (tick % 20 == 0) send_events(); /* every ~200 ms */
		check_stalls(tick);
		if (write_rate > 0) {
			/* Same tick-based stall rule for the writer and the verifier. */
			uint64_t w = __atomic_load_n(&pages_written, __ATOMIC_RELAXED);
			uint64_t v = __atomic_load_n(&rate_verified, __ATOMIC_RELAXED);
			if (w != last_written) last_written = w, written_tick = tick;
			if (v != last_verified) last_verified = v, verified_tick = tick;
			if (tick - written_tick > STALL_TICKS && !writer_stalled)
				writer_stalled = 1, wl_error("stalled-writer pages_written=%llu", (unsigned long long)w);
			if (tick - verified_tick > STALL_TICKS && !verifier_stalled)
				verifier_stalled = 1, wl_error("stalled-verifier verified=%llu", (unsigned long long)v);
		}
		tick++;

		uint64_t now = wl_now_ns();
		if (wl_term || !ready || now - last_status >= 50 * 1000000ull) {
			extra[0] = 0;
			if (write_rate > 0) {
				verified = __atomic_load_n(&rate_verified, __ATOMIC_RELAXED);
				sweeps = __atomic_load_n(&rate_sweeps, __ATOMIC_RELAXED);
			}
			wl_append(extra, sizeof extra,
				  "mib=%zu region=%p pages=%zu verified_pages=%llu sweeps=%llu rewrites=%llu threads=%s",
				  mib, (void *)region, npages, (unsigned long long)verified,
				  (unsigned long long)sweeps, (unsigned long long)rewrites, thr);
			if (write_rate > 0) {
				uint64_t w = __atomic_load_n(&pages_written, __ATOMIC_RELAXED);
				hist_t[hist_n % HIST] = now, hist_p[hist_n % HIST] = w, hist_n++;
				/* the oldest sample within ~1 s (else the newest: rate 0 until a second sample) */
				unsigned start = hist_n > HIST ? hist_n % HIST : 0, oldest = (hist_n - 1) % HIST;
				for (unsigned m = 0; m < HIST && m < hist_n; m++) {
					unsigned c = (start + m) % HIST;
					if (now - hist_t[c] <= 1100000000ull) {
						oldest = c;
						break;
					}
				}
				double win = (double)(now - hist_t[oldest]) / 1e9, all = (double)(now - rate_t0) / 1e9;
				double mbps = win > 0.05 ? (double)(w - hist_p[oldest]) * PAGE / 1e6 / win : 0;
				double avg = all > 0 ? (double)w * PAGE / 1e6 / all : 0;
				wl_append(extra, sizeof extra,
					  " write_rate=%.3f write_mbps=%.2f write_mbps_avg=%.2f pages_written=%llu verify_skips=%llu",
					  write_rate, mbps, avg, (unsigned long long)w,
					  (unsigned long long)__atomic_load_n(&verify_skips, __ATOMIC_RELAXED));
			}
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
