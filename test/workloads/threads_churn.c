/* threads_churn — creates and joins short-lived threads in a tight loop while long-lived threads run.
 * Used to test that a freeze catches threads created during the seize.
 *
 * Usage: threads_churn --status FILE [--long N] [--churners N] [--gap-us N]
 *   --long N      long-lived threads (default 3): each wakes every 1 ms, bumps its counter, checks TLS
 *   --churners N  threads doing create+join loops (default 1)
 *   --gap-us N    sleep between creations in each churner (default 100 µs)
 * Short-lived threads set + check a __thread value and return a function of their sequence number,
 * which the joiner checks. pthread_create/join failures are errors. A long-lived thread or churner
 * that does not advance for 250 main ticks (~5 s of main running; freeze-tolerant) is "stalled-<name>".
 * Status keys: tick errors phase threads_created threads_joined long_ticks long churners
 */
#include "wl.h"
#include <pthread.h>

#define MAXT 64
#define STALL_TICKS 250
static __thread uint64_t tls_val;
static uint64_t created, joined;
static uint64_t long_cnt[MAXT], churn_cnt[MAXT];

static void *short_fn(void *arg)
{
	uint64_t seq = (uint64_t)(uintptr_t)arg;
	tls_val = seq * 3 + 1;
	__asm__ volatile("" ::: "memory");
	if (tls_val != seq * 3 + 1) wl_error("short-thread-tls seq=%llu", (unsigned long long)seq);
	return (void *)(uintptr_t)(seq ^ 0x5a5a5a5a);
}

static int gap_us = 100;
static void *churner(void *arg)
{
	int id = (int)(uintptr_t)arg;
	tls_val = 0xC0000 + id;
	for (uint64_t seq = 1;; seq++) {
		pthread_t t;
		int r = pthread_create(&t, NULL, short_fn, (void *)(uintptr_t)seq);
		if (r) {
			wl_error("pthread_create-failed %s", strerror(r));
			wl_sleep_ms(10);
			continue;
		}
		__atomic_add_fetch(&created, 1, __ATOMIC_SEQ_CST);
		void *ret = NULL;
		r = pthread_join(t, &ret);
		if (r) wl_error("pthread_join-failed %s", strerror(r));
		else if ((uintptr_t)ret != (seq ^ 0x5a5a5a5a)) wl_error("join-bad-retval seq=%llu", (unsigned long long)seq);
		__atomic_add_fetch(&joined, 1, __ATOMIC_SEQ_CST);
		if (tls_val != 0xC0000ull + id) wl_error("churner-tls id=%d", id);
		__atomic_add_fetch(&churn_cnt[id], 1, __ATOMIC_SEQ_CST);
		if (gap_us) {
			struct timespec ts = {0, gap_us * 1000L};
			nanosleep(&ts, NULL);
		}
	}
	return NULL;
}

static void *long_fn(void *arg)
{
	int id = (int)(uintptr_t)arg;
	tls_val = 0x10000 + id;
	for (;;) {
		struct timespec ts = {0, 1000000};
		int r = clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, NULL);
		if (r) wl_error("long-%d-clock_nanosleep %s", id, strerror(r));
		if (tls_val != 0x10000ull + id) wl_error("long-%d-tls", id);
		__atomic_add_fetch(&long_cnt[id], 1, __ATOMIC_SEQ_CST);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	int nlong = 3, nchurn = 1;
	wl_init(argc, argv);
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--status")) i++;
		else if (!strcmp(argv[i], "--long") && i + 1 < argc) nlong = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--churners") && i + 1 < argc) nchurn = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--gap-us") && i + 1 < argc) gap_us = atoi(argv[++i]);
		else {
			fprintf(stderr, "threads_churn: unknown argument %s\n", argv[i]);
			return 2;
		}
	}
	if (nlong < 0 || nlong > MAXT || nchurn < 0 || nchurn > MAXT || gap_us < 0 || gap_us >= 1000000) {
		fprintf(stderr, "threads_churn: bad --long/--churners/--gap-us\n");
		return 2;
	}
	sigset_t term, old;
	sigemptyset(&term);
	sigaddset(&term, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &term, &old); /* inherited by all threads but main */
	for (int i = 0; i < nlong + nchurn; i++) {
		pthread_t t;
		int r = i < nlong ? pthread_create(&t, NULL, long_fn, (void *)(uintptr_t)i)
				  : pthread_create(&t, NULL, churner, (void *)(uintptr_t)(i - nlong));
		if (r) {
			fprintf(stderr, "threads_churn: pthread_create: %s\n", strerror(r));
			return 2;
		}
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);

	uint64_t last_long[MAXT] = {0}, last_churn[MAXT] = {0}, since_long[MAXT] = {0}, since_churn[MAXT] = {0};
	int stalled_long[MAXT] = {0}, stalled_churn[MAXT] = {0};
	char extra[512];
	for (uint64_t tick = 0;; tick++) {
		uint64_t lsum = 0;
		for (int i = 0; i < nlong; i++) {
			uint64_t c = __atomic_load_n(&long_cnt[i], __ATOMIC_SEQ_CST);
			lsum += c;
			if (c != last_long[i]) last_long[i] = c, since_long[i] = tick;
			else if (tick - since_long[i] > STALL_TICKS && !stalled_long[i])
				stalled_long[i] = 1, wl_error("stalled-long-%d", i);
		}
		for (int i = 0; i < nchurn; i++) {
			uint64_t c = __atomic_load_n(&churn_cnt[i], __ATOMIC_SEQ_CST);
			if (c != last_churn[i]) last_churn[i] = c, since_churn[i] = tick;
			else if (tick - since_churn[i] > STALL_TICKS && !stalled_churn[i])
				stalled_churn[i] = 1, wl_error("stalled-churner-%d", i);
		}
		snprintf(extra, sizeof extra, "threads_created=%llu threads_joined=%llu long_ticks=%llu long=%d churners=%d",
			 (unsigned long long)__atomic_load_n(&created, __ATOMIC_SEQ_CST),
			 (unsigned long long)__atomic_load_n(&joined, __ATOMIC_SEQ_CST), (unsigned long long)lsum,
			 nlong, nchurn);
		if (wl_term) wl_exit(tick, extra);
		wl_write_status("running", tick, extra);
		if (tick == 0) wl_ready(NULL);
		wl_sleep_ms(20);
	}
}
