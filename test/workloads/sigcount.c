/* sigcount — counts received signals so a test can check none was lost or invented during a freeze.
 *
 * Usage: sigcount --status FILE
 *   SIGUSR1: handler with SA_RESTART        -> key usr1
 *   SIGUSR2: handler without SA_RESTART     -> key usr2 (blocked in the worker thread, so it is
 *            always handled by the main thread; a SIGUSR2 handled in the worker is an error)
 *   SIGRTMIN: SA_SIGINFO handler, queued (never coalesced) -> keys rt, rt_sum (sum of si_value.sival_int)
 * Standard signals coalesce while pending: send SIGUSR1/2 one at a time and wait for the count to move;
 * use SIGRTMIN (`sigqueue`, or plain kill: value 0) to fire many at once and expect exact counts.
 * A worker thread does blocking 8-byte read()s from a pipe that main feeds every ~100 ms; since SIGUSR1
 * is SA_RESTART and SIGUSR2/SIGRTMIN are blocked there, the read must never fail (EINTR = error) and
 * must return the exact sequence. Key reads. Main's own sleep may be interrupted (fine).
 * Status keys: tick errors phase usr1 usr2 rt rt_sum rtmin reads
 */
#include "wl.h"
#include <pthread.h>

static volatile uint64_t usr1, usr2, rt, rt_sum, usr2_in_worker, reads;
static pthread_t main_thread;
static int pipefd[2];

static void on_usr1(int s)
{
	(void)s;
	__atomic_add_fetch(&usr1, 1, __ATOMIC_SEQ_CST);
}
static void on_usr2(int s)
{
	(void)s;
	__atomic_add_fetch(&usr2, 1, __ATOMIC_SEQ_CST);
	if (!pthread_equal(pthread_self(), main_thread)) __atomic_add_fetch(&usr2_in_worker, 1, __ATOMIC_SEQ_CST);
}
static void on_rt(int s, siginfo_t *si, void *uc)
{
	(void)s, (void)uc;
	__atomic_add_fetch(&rt, 1, __ATOMIC_SEQ_CST);
	__atomic_add_fetch(&rt_sum, (uint64_t)(int64_t)si->si_value.sival_int, __ATOMIC_SEQ_CST);
}

static void *reader(void *arg)
{
	(void)arg;
	for (uint64_t k = 1;; k++) {
		uint64_t v = 0;
		ssize_t r = read(pipefd[0], &v, 8);
		if (r != 8 || v != k)
			wl_error("worker-read r=%zd errno=%d(%s) v=%llu want=%llu", r, r < 0 ? errno : 0,
				 r < 0 ? strerror(errno) : "-", (unsigned long long)v, (unsigned long long)k);
		__atomic_add_fetch(&reads, 1, __ATOMIC_SEQ_CST);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--status")) i++;
		else {
			fprintf(stderr, "sigcount: unknown argument %s\n", argv[i]);
			return 2;
		}
	}
	main_thread = pthread_self();
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGUSR1, &sa, NULL);
	sa.sa_handler = on_usr2;
	sa.sa_flags = 0;
	sigaction(SIGUSR2, &sa, NULL);
	sa.sa_sigaction = on_rt;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	sigaction(SIGRTMIN, &sa, NULL);
	if (pipe(pipefd)) {
		perror("sigcount: pipe");
		return 2;
	}
	sigset_t blk, old;
	sigemptyset(&blk);
	sigaddset(&blk, SIGTERM);
	sigaddset(&blk, SIGUSR2);
	sigaddset(&blk, SIGRTMIN);
	pthread_sigmask(SIG_BLOCK, &blk, &old);
	pthread_t t;
	if (pthread_create(&t, NULL, reader, NULL)) {
		fprintf(stderr, "sigcount: pthread_create failed\n");
		return 2;
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);

	char extra[512];
	uint64_t sent = 0, last_reads = 0, since = 0;
	int reported_w = 0, stalled = 0;
	for (uint64_t tick = 0;; tick++) {
		uint64_t rd = __atomic_load_n(&reads, __ATOMIC_SEQ_CST);
		if (tick % 10 == 0 && rd == sent) {
			uint64_t k = ++sent;
			if (write(pipefd[1], &k, 8) != 8) wl_error("main-pipe-write errno=%d", errno);
		}
		if (rd != last_reads || rd == sent) last_reads = rd, since = tick;
		else if (tick - since > 500 && !stalled) stalled = 1, wl_error("stalled-reader");
		if (__atomic_load_n(&usr2_in_worker, __ATOMIC_SEQ_CST) && !reported_w)
			reported_w = 1, wl_error("SIGUSR2-handled-in-worker-thread-where-it-is-blocked");
		snprintf(extra, sizeof extra, "usr1=%llu usr2=%llu rt=%llu rt_sum=%lld rtmin=%d reads=%llu",
			 (unsigned long long)__atomic_load_n(&usr1, __ATOMIC_SEQ_CST),
			 (unsigned long long)__atomic_load_n(&usr2, __ATOMIC_SEQ_CST),
			 (unsigned long long)__atomic_load_n(&rt, __ATOMIC_SEQ_CST),
			 (long long)__atomic_load_n(&rt_sum, __ATOMIC_SEQ_CST), SIGRTMIN, (unsigned long long)rd);
		if (wl_term) wl_exit(tick, extra);
		wl_write_status("running", tick, extra);
		if (tick == 0) wl_ready(extra);
		wl_sleep_ms(10);
	}
}
