// Test fixture for the ptrace / remote-syscall tests (compiled at test time with `cc`).
//
//   tracee SHM DIR LEADER_ROLE SLEEP_MS     LEADER_ROLE: counter | read | epoll | nanosleep | futex
//   tracee SHM DIR spawn                    threads created and exiting in a tight loop
//
// Roles: "read" blocks in read() on DIR/read.fifo, "epoll" in epoll_wait() on DIR/epoll.fifo,
// "nanosleep" in one nanosleep(SLEEP_MS), "futex" in FUTEX_WAIT on a word of SHM, "counter"
// increments a counter in SHM and checks a checksummed memory region, and is the only thread with
// SIGUSR1 unblocked (its handler counts deliveries). The leader plays LEADER_ROLE, threads play
// the rest. Every result goes to SHM (a file mapped MAP_SHARED) as int64 words:
//   W[0] counter  W[1] checksum errors  W[2] SIGUSR1 count  W[3] futex word (low 32 bits)
//   W[4] roles about to block  W[5] threads spawned
//   W[16 + 8*role + {0 done, 1 ret, 2 errno, 3 EINTR count, 4 elapsed ms}]  role: 0 read,
//   1 epoll, 2 nanosleep, 3 futex
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static volatile int64_t *W;
static const char *dir;
static long sleep_ms;

#define ROLE(r, f) W[16 + 8 * (r) + (f)]
enum { R_READ, R_EPOLL, R_NANOSLEEP, R_FUTEX, R_COUNTER };

static int64_t now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static void on_usr1(int s) { (void)s; __atomic_add_fetch(&W[2], 1, __ATOMIC_SEQ_CST); }

static void finish(int role, long ret, int err, long eintr, int64_t t0)
{
	ROLE(role, 1) = ret;
	ROLE(role, 2) = err;
	ROLE(role, 3) = eintr;
	ROLE(role, 4) = now_ms() - t0;
	__atomic_store_n(&ROLE(role, 0), 1, __ATOMIC_SEQ_CST);
}

static int open_fifo(const char *name)
{
	char p[4096];
	snprintf(p, sizeof p, "%s/%s", dir, name);
	return open(p, O_RDWR); /* O_RDWR: never blocks, never sees EOF */
}

static void role_read(void)
{
	int fd = open_fifo("read.fifo");
	char buf[64];
	long n, eintr = 0;
	int64_t t0 = now_ms();
	__atomic_add_fetch(&W[4], 1, __ATOMIC_SEQ_CST);
	while ((n = read(fd, buf, sizeof buf)) < 0 && errno == EINTR) eintr++;
	finish(R_READ, n, n < 0 ? errno : 0, eintr, t0);
}

static void role_epoll(void)
{
	int fd = open_fifo("epoll.fifo");
	int ep = epoll_create1(0);
	struct epoll_event ev = { .events = EPOLLIN, .data.fd = fd };
	epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
	long n, eintr = 0;
	int64_t t0 = now_ms();
	__atomic_add_fetch(&W[4], 1, __ATOMIC_SEQ_CST);
	while ((n = epoll_wait(ep, &ev, 1, -1)) < 0 && errno == EINTR) eintr++;
	finish(R_EPOLL, n, n < 0 ? errno : 0, eintr, t0);
}

static void role_nanosleep(void)
{
	struct timespec ts = { sleep_ms / 1000, (sleep_ms % 1000) * 1000000L }, rem;
	int64_t t0 = now_ms();
	__atomic_add_fetch(&W[4], 1, __ATOMIC_SEQ_CST);
	long n = syscall(SYS_nanosleep, &ts, &rem); /* one call: an EINTR would show */
	finish(R_NANOSLEEP, n, n < 0 ? errno : 0, n < 0 && errno == EINTR, t0);
}

static void role_futex(void)
{
	volatile int32_t *word = (volatile int32_t *)&W[3];
	long n = 0, eintr = 0;
	int err = 0;
	int64_t t0 = now_ms();
	__atomic_add_fetch(&W[4], 1, __ATOMIC_SEQ_CST);
	while (*word == 0) {
		n = syscall(SYS_futex, word, FUTEX_WAIT, 0, NULL, NULL, 0); /* shared futex */
		if (n < 0 && errno == EINTR) eintr++;
		else if (n < 0 && errno != EAGAIN) { err = errno; break; }
	}
	finish(R_FUTEX, n, err, eintr, t0);
}

static void role_counter(void)
{
	sigset_t s;
	sigemptyset(&s);
	sigaddset(&s, SIGUSR1);
	pthread_sigmask(SIG_UNBLOCK, &s, NULL);
	size_t len = 256 * 1024;
	unsigned char *m = malloc(len);
	for (uint64_t c = 1;; c++) {
		memset(m, (int)(c & 0xff), len);
		uint64_t sum = 0;
		for (size_t i = 0; i < len; i += 64) sum += m[i];
		if (sum != (c & 0xff) * (len / 64)) W[1]++;
		__atomic_store_n(&W[0], (int64_t)c, __ATOMIC_SEQ_CST);
		usleep(200);
	}
}

static void *thread_main(void *arg)
{
	switch ((int)(intptr_t)arg) {
	case R_READ: role_read(); break;
	case R_EPOLL: role_epoll(); break;
	case R_NANOSLEEP: role_nanosleep(); break;
	case R_FUTEX: role_futex(); break;
	case R_COUNTER: role_counter(); break;
	}
	for (;;) pause(); /* SIGUSR1 is blocked here, so this never returns */
	return NULL;
}

static void *short_lived(void *arg)
{
	(void)arg;
	__atomic_add_fetch(&W[5], 1, __ATOMIC_SEQ_CST);
	return NULL;
}

static void *spawner(void *arg)
{
	(void)arg;
	pthread_attr_t a;
	pthread_attr_init(&a);
	pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
	pthread_attr_setstacksize(&a, 64 * 1024);
	for (;;) {
		pthread_t t;
		if (pthread_create(&t, &a, short_lived, NULL)) usleep(100);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc < 4) { fprintf(stderr, "usage\n"); return 2; }
	int fd = open(argv[1], O_RDWR);
	W = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (W == MAP_FAILED) return 3;
	dir = argv[2];
	sleep_ms = argc > 4 ? atol(argv[4]) : 1000;
	struct sigaction sa = { .sa_handler = on_usr1, .sa_flags = SA_RESTART };
	sigaction(SIGUSR1, &sa, NULL);
	sigset_t s;
	sigemptyset(&s);
	sigaddset(&s, SIGUSR1);
	pthread_sigmask(SIG_BLOCK, &s, NULL); /* inherited by every thread; counter unblocks */

	pthread_t t;
	if (!strcmp(argv[3], "spawn")) {
		for (int i = 0; i < 3; i++) pthread_create(&t, NULL, spawner, NULL);
		role_counter();
	}
	const char *names[] = { "read", "epoll", "nanosleep", "futex", "counter" };
	int leader = -1;
	for (int r = 0; r < 5; r++)
		if (!strcmp(argv[3], names[r])) leader = r;
	if (leader < 0) return 2;
	for (int r = 0; r < 5; r++)
		if (r != leader) pthread_create(&t, NULL, thread_main, (void *)(intptr_t)r);
	thread_main((void *)(intptr_t)leader);
	return 0;
}
