/* source_safety fixture: a counter thread and a SIGCONT counter, published in a shared file.
 * Usage: fixture SHMFILE. Words: [0] counter (main, +1 every 1 ms), [1] SIGCONTs handled,
 * [2] a second thread's nanosleep loop count. */
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <fcntl.h>
#include <time.h>
#include <unistd.h>

static volatile int64_t *w;

static void on_cont(int s)
{
	(void)s;
	__atomic_add_fetch(&w[1], 1, __ATOMIC_SEQ_CST);
}

static void *sleeper(void *a)
{
	(void)a;
	for (;;) {
		struct timespec ts = {0, 5 * 1000 * 1000};
		nanosleep(&ts, NULL);
		__atomic_add_fetch(&w[2], 1, __ATOMIC_SEQ_CST);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc < 2) return 2;
	int fd = open(argv[1], O_RDWR);
	if (fd < 0) return 3;
	w = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (w == MAP_FAILED) return 4;
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_cont;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGCONT, &sa, NULL);
	pthread_t t;
	pthread_create(&t, NULL, sleeper, NULL);
	for (;;) {
		struct timespec ts = {0, 1000 * 1000};
		nanosleep(&ts, NULL);
		__atomic_add_fetch(&w[0], 1, __ATOMIC_SEQ_CST);
	}
}
