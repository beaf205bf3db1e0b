// Self-verifying fixture for cold dump/restore tests (crates/tern-core/tests/cold_restore.rs).
// Usage: fixture STATUS MIB NTHREADS MAPFILE
// - MIB MiB of anonymous memory: a quarter never touched, a quarter written with zeros, half with
//   a pattern keyed by (page, generation); main rewrites 8 pages a tick and verifies 256.
// - brk grown by 8 MiB (pattern), shrunk by 4 MiB; every 50 ticks grown by 1 MiB and shrunk back.
// - MAPFILE mapped MAP_PRIVATE: page 0 must keep the file's content, page 1 holds private writes.
// - ITIMER_REAL every 10 ms (SIGALRM counted), SIGRTMIN (SA_SIGINFO) counted with value sum.
// - NTHREADS workers: kinds cycle sleep / futex / spin / altstack; each checks its TLS and its
//   signal mask (workers block SIGALRM and SIGRTMIN) every loop.
// Status: one line rewritten by path (tmp + rename) every ~20 ms.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define PG 4096
static const char *status_path;
static volatile uint64_t errors, alarms, rt_count, rt_sum;
static char lasterror[128];
static uint8_t *region;
static size_t npages;
static uint32_t *gen;
static uint8_t *brk_base;
static uint8_t *fmap;
static uint32_t futex_word;
static volatile uint64_t wcount[64];
static int nthreads;
static __thread uint64_t tls_val;

static void fail(const char *what, uint64_t a)
{
	if (__atomic_add_fetch(&errors, 1, __ATOMIC_SEQ_CST) == 1)
		snprintf(lasterror, sizeof lasterror, "%s-%llu", what, (unsigned long long)a);
}

static uint64_t word(size_t page, uint32_t g, size_t j) { return (page * 0x9E3779B97F4A7C15ull) ^ ((uint64_t)g << 32) ^ j; }
static int kind_of(size_t page) { return page % 4; } /* 0 untouched, 1 zeros, 2-3 pattern */

static void fill(size_t p)
{
	uint64_t *w = (uint64_t *)(region + p * PG);
	if (kind_of(p) == 1) { memset(w, 0, PG); return; }
	for (size_t j = 0; j < PG / 8; j++) w[j] = word(p, gen[p], j);
}

static void verify(size_t p)
{
	uint64_t *w = (uint64_t *)(region + p * PG);
	if (kind_of(p) < 2) {
		for (size_t j = 0; j < PG / 8; j++) if (w[j]) { fail("nonzero-page", p); return; }
		return;
	}
	for (size_t j = 0; j < PG / 8; j++) if (w[j] != word(p, gen[p], j)) { fail("bad-page", p); return; }
}

static void on_alarm(int s) { (void)s; alarms++; }
static void on_rt(int s, siginfo_t *si, void *c) { (void)s; (void)c; rt_count++; rt_sum += si->si_value.sival_int; }

static void check_mask(int worker)
{
	sigset_t m;
	pthread_sigmask(SIG_BLOCK, NULL, &m);
	if (worker && (!sigismember(&m, SIGALRM) || !sigismember(&m, SIGRTMIN))) fail("worker-mask", 0);
	if (!worker && (sigismember(&m, SIGALRM) || sigismember(&m, SIGRTMIN) || !sigismember(&m, SIGUSR2))) fail("main-mask", 0);
}

static void *worker(void *arg)
{
	int i = (int)(intptr_t)arg, kind = i % 4;
	tls_val = 0xabc000 + i;
	char *alt = NULL;
	if (kind == 3) {
		alt = malloc(65536);
		stack_t ss = {.ss_sp = alt, .ss_size = 65536};
		sigaltstack(&ss, NULL);
	}
	for (uint32_t last = 0;;) {
		if (tls_val != 0xabc000u + i) fail("tls", i);
		check_mask(1);
		if (kind == 0) {
			struct timespec ts = {0, 5000000};
			if (nanosleep(&ts, NULL)) fail("nanosleep", errno);
		} else if (kind == 1) {
			uint32_t v = __atomic_load_n(&futex_word, __ATOMIC_SEQ_CST);
			if (v == last) syscall(SYS_futex, &futex_word, FUTEX_WAIT_PRIVATE, v, NULL, NULL, 0);
			last = __atomic_load_n(&futex_word, __ATOMIC_SEQ_CST);
		} else if (kind == 2) {
			volatile uint64_t x = 0;
			for (int k = 0; k < 100000; k++) x += k;
			sched_yield();
		} else {
			stack_t old;
			sigaltstack(NULL, &old);
			if (old.ss_sp != alt || old.ss_size != 65536) fail("altstack", i);
			struct timespec ts = {0, 3000000};
			nanosleep(&ts, NULL);
		}
		wcount[i]++;
	}
	return NULL;
}

static void write_status(uint64_t tick)
{
	char line[4096], tmp[4200];
	int n = snprintf(line, sizeof line, "pid=%d tick=%llu errors=%llu alarms=%llu rt=%llu rtsum=%llu", getpid(),
			 (unsigned long long)tick, (unsigned long long)errors, (unsigned long long)alarms,
			 (unsigned long long)rt_count, (unsigned long long)rt_sum);
	for (int i = 0; i < nthreads; i++) n += snprintf(line + n, sizeof line - n, " w%d=%llu", i, (unsigned long long)wcount[i]);
	if (errors) n += snprintf(line + n, sizeof line - n, " lasterror=%s", lasterror);
	line[n++] = '\n';
	snprintf(tmp, sizeof tmp, "%s.tmp", status_path);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) return;
	if (write(fd, line, n) != n) fail("status-write", 0);
	close(fd);
	rename(tmp, status_path);
}

int main(int argc, char **argv)
{
	if (argc < 5) return 2;
	status_path = argv[1];
	size_t mib = strtoul(argv[2], NULL, 0);
	nthreads = atoi(argv[3]);
	npages = mib * 256;
	region = mmap(NULL, npages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	gen = calloc(npages, sizeof *gen);
	for (size_t p = 0; p < npages; p++) if (kind_of(p)) fill(p);
	/* brk */
	brk_base = sbrk(0);
	if (sbrk(8 << 20) == (void *)-1) return 3;
	for (size_t i = 0; i < (8u << 20); i += 8) *(uint64_t *)(brk_base + i) = i ^ 0x5555;
	sbrk(-(4 << 20));
	/* private file mapping */
	int mf = open(argv[4], O_RDONLY);
	fmap = mmap(NULL, 4 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, mf, 0);
	close(mf);
	if (fmap == MAP_FAILED) return 4;
	memset(fmap + PG, 0x5a, PG);
	/* signals */
	struct sigaction sa = {0};
	sa.sa_handler = on_alarm;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGALRM, &sa, NULL);
	struct sigaction sr = {0};
	sr.sa_sigaction = on_rt;
	sr.sa_flags = SA_SIGINFO | SA_RESTART;
	sigaction(SIGRTMIN, &sr, NULL);
	signal(SIGUSR2, SIG_IGN);
	sigset_t block;
	sigemptyset(&block);
	sigaddset(&block, SIGALRM);
	sigaddset(&block, SIGRTMIN);
	pthread_sigmask(SIG_BLOCK, &block, NULL);
	for (int i = 0; i < nthreads; i++) {
		pthread_t t;
		pthread_create(&t, NULL, worker, (void *)(intptr_t)i);
	}
	pthread_sigmask(SIG_UNBLOCK, &block, NULL);
	sigset_t u2;
	sigemptyset(&u2);
	sigaddset(&u2, SIGUSR2);
	pthread_sigmask(SIG_BLOCK, &u2, NULL);
	struct itimerval it = {{0, 10000}, {0, 10000}};
	setitimer(ITIMER_REAL, &it, NULL);
	tls_val = 0x1234;
	uint64_t seed = 88172645463325252ull, cursor = 0;
	for (uint64_t tick = 1;; tick++) {
		for (int k = 0; k < 8; k++) {
			seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
			size_t p = seed % npages;
			if (kind_of(p) >= 2) { verify(p); gen[p]++; fill(p); }
		}
		for (int k = 0; k < 256; k++) { verify(cursor); cursor = (cursor + 1) % npages; }
		for (size_t i = 0; i < (4u << 20); i += 4096 * 7) if (*(uint64_t *)(brk_base + i) != (i ^ 0x5555)) fail("brk", i);
		if (tick % 50 == 0) {
			uint8_t *b = sbrk(1 << 20);
			if (b == (void *)-1 || b != brk_base + (4 << 20)) fail("sbrk-grow", tick);
			else { memset(b, 1, 1 << 20); sbrk(-(1 << 20)); }
		}
		for (int j = 0; j < PG; j++) {
			if (fmap[j] != (uint8_t)(j * 7)) { fail("file-page", j); break; }
			if (fmap[PG + j] != 0x5a) { fail("private-write", j); break; }
		}
		if (tls_val != 0x1234) fail("main-tls", 0);
		check_mask(0);
		__atomic_add_fetch(&futex_word, 1, __ATOMIC_SEQ_CST);
		syscall(SYS_futex, &futex_word, FUTEX_WAKE_PRIVATE, 64, NULL, NULL, 0);
		if (tick % 4 == 0) write_status(tick);
		struct timespec ts = {0, 5000000};
		nanosleep(&ts, NULL);
	}
}
