/* Pre-copy stale-page fixture: memory whose content goes away after a round has sent it, which
 * the final freeze must overwrite at the destination (crates/tern-core/src/dump/precopy.rs,
 * overwrite_stale).
 *
 * Usage: stale STATUS FILE
 *   rw    32 private anonymous pages, writable (tracked by the dirty tracker)
 *   ro    32 private anonymous pages, filled then made read-only (never tracked: not writable)
 *   file  FILE (16 pages, written by the test) mapped MAP_PRIVATE read/write, every page
 *         written once: each is a COW copy of the file page
 * Page i of each area holds a pattern of (area, i); a file page as the file holds it: FILE_BYTE(i).
 * stdin commands (one line each), answered "done":
 *   "d I"  MADV_DONTNEED rw page I: it reads as zeros from now on
 *   "a I"  MADV_DONTNEED ro page I: zeros from now on
 *   "f I"  MADV_DONTNEED file page I without touching it again: the file's content from now on
 *   "g I"  as "f", then read the page back at once (the page-cache page is mapped again)
 * Every ~2 ms every page still holding its pattern is checked (any mismatch: errors++). Pages
 * dropped by "a" and "f" are left alone (reading them would change what the kernel reports about
 * them) until SIGUSR1: from then on every page is checked against what it must hold.
 * Status (atomically replaced): tick errors rw ro file dropped full_checks */
#define _GNU_SOURCE
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "common.h"

#define NANON 32
#define NFILE 16
#define FILE_BYTE(i) ((unsigned char)(0x40 + (i)))

enum state { PATTERN, ZERO, FROM_FILE };
static uint64_t *rw, *ro;
static unsigned char *file;
static enum state rw_state[NANON], ro_state[NANON], file_state[NFILE];
static int untouched_ro[NANON], untouched_file[NFILE];
static unsigned long errors, dropped, full_checks;
static volatile sig_atomic_t check_all;

static int page_ok(const unsigned char *page, enum state st, uint64_t seed, unsigned char file_byte) {
	const uint64_t *p = (const uint64_t *)page;
	for (int j = 0; j < W; j++) {
		uint64_t want = st == PATTERN ? mix(seed, j) : st == ZERO ? 0 : 0x0101010101010101ull * file_byte;
		if (p[j] != want) return 0;
	}
	return 1;
}

static void check(int all) {
	for (int i = 0; i < NANON; i++) {
		if (!page_ok((unsigned char *)(rw + i * W), rw_state[i], 1000 + i, 0)) errors++;
		if ((all || !untouched_ro[i]) && !page_ok((unsigned char *)(ro + i * W), ro_state[i], 2000 + i, 0)) errors++;
	}
	for (int i = 0; i < NFILE; i++)
		if ((all || !untouched_file[i]) && !page_ok(file + i * PG, file_state[i], 3000 + i, FILE_BYTE(i))) errors++;
	if (all) full_checks++;
}

static const char *status_path;
static void status(unsigned long tick) {
	char buf[512];
	int n = snprintf(buf, sizeof buf, "tick=%lu errors=%lu rw=%lu ro=%lu file=%lu dropped=%lu full_checks=%lu pid=%d\n",
			 tick, errors, (unsigned long)rw, (unsigned long)ro, (unsigned long)file, dropped, full_checks, getpid());
	if (write_status(status_path, buf, n)) errors++;
}

static void command(char *line) {
	char c = line[0];
	long i = atol(line + 1);
	if ((c == 'd' || c == 'a') && i >= 0 && i < NANON) {
		uint64_t *base = c == 'd' ? rw : ro;
		if (madvise(base + i * W, PG, MADV_DONTNEED)) errors++;
		if (c == 'd') rw_state[i] = ZERO;
		else ro_state[i] = ZERO, untouched_ro[i] = 1;
		dropped++;
	} else if ((c == 'f' || c == 'g') && i >= 0 && i < NFILE) {
		if (madvise(file + i * PG, PG, MADV_DONTNEED)) errors++;
		file_state[i] = FROM_FILE;
		if (c == 'f') untouched_file[i] = 1;
		else if (!page_ok(file + i * PG, FROM_FILE, 0, FILE_BYTE(i))) errors++;
		dropped++;
	} else {
		errors++;
	}
	printf("done\n");
	fflush(stdout);
}

static void on_usr1(int sig) { (void)sig; check_all = 1; }

int main(int argc, char **argv) {
	if (argc < 3) return 2;
	status_path = argv[1];
	int fd = open(argv[2], O_RDONLY);
	if (fd < 0) return 3;
	rw = mmap(NULL, NANON * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ro = mmap(NULL, NANON * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	file = mmap(NULL, NFILE * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	close(fd);
	if (rw == MAP_FAILED || ro == MAP_FAILED || file == MAP_FAILED) return 4;
	for (int i = 0; i < NANON; i++) fill(rw + i * W, 1000 + i), fill(ro + i * W, 2000 + i);
	if (mprotect(ro, NANON * PG, PROT_READ)) return 5;
	for (int i = 0; i < NFILE; i++) {
		if (!page_ok(file + i * PG, FROM_FILE, 0, FILE_BYTE(i))) return 6; /* the file is as the test wrote it */
		fill((uint64_t *)(file + i * PG), 3000 + i);
	}
	struct sigaction sa = { .sa_handler = on_usr1 };
	sigaction(SIGUSR1, &sa, NULL);
	fcntl(0, F_SETFL, O_NONBLOCK);
	struct timespec last = { 0 };
	for (unsigned long tick = 0;; tick++) {
		check(check_all);
		poll_commands(command);
		struct timespec now;
		clock_gettime(CLOCK_MONOTONIC, &now);
		if ((now.tv_sec - last.tv_sec) * 1000000000L + (now.tv_nsec - last.tv_nsec) > 5000000L) {
			status(tick);
			last = now;
		}
		usleep(2000);
	}
}
