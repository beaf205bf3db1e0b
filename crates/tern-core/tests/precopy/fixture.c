/* Pre-copy fixture: a region written at a controlled rate with a self-verifying pattern, plus
 * optional churn (mmap/munmap of small regions, heap grown and shrunk with sbrk), and a command
 * channel on stdin for exactness tests.
 *
 * Usage: fixture STATUS MIB RATE CHURN
 *   RATE  pages rewritten per second (whole page, gen[i]++); 0 = none
 *   CHURN 1 = every ~5 ms map/unmap a region of 1..64 pages and grow/shrink the heap
 * stdin commands (one line each), answered on stdout:
 *   "w N"  write N distinct pages (stride 7) -> prints "p <index>" per page then "done"
 *   "m N"  mmap N fresh pages, write every other one -> "m <addr> <written...>" "done"
 *   "u"    munmap the last "m" region -> "done"
 *   "b N"  grow the heap by N pages and write them -> "b <addr>" "done"
 *   "s N"  shrink the heap by N pages -> "done"
 * Status (every ~10 ms, atomically replaced): tick errors region pages writes verified churn */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "common.h"

static uint64_t *region;
static uint32_t *gen;
static size_t npages;
static unsigned long errors, writes, verified, churned;

static int check(const uint64_t *p, uint64_t seed) {
	for (int j = 0; j < W; j++) if (p[j] != mix(seed, j)) return 0;
	return 1;
}
static void write_page(size_t i) { gen[i]++; fill(region + i * W, i << 32 | gen[i]); writes++; }
static void verify_page(size_t i) { if (!check(region + i * W, i << 32 | gen[i])) errors++; verified++; }

/* churn: up to 8 mapped regions with a pattern, and a heap tail */
struct creg { uint64_t *p; size_t n; uint64_t seed; };
static struct creg cr[8];
static int ncr;
static uint64_t *heap0; static size_t heap_pages; static uint64_t heap_seed = 77;
static uint64_t rnd = 88172645463325252ull;
static uint64_t xr(void) { rnd ^= rnd << 13; rnd ^= rnd >> 7; rnd ^= rnd << 17; return rnd; }
static void churn_verify(void) {
	for (int k = 0; k < ncr; k++)
		for (size_t i = 0; i < cr[k].n; i++) if (!check(cr[k].p + i * W, cr[k].seed + i)) errors++;
	for (size_t i = 0; i < heap_pages; i++) if (!check(heap0 + i * W, heap_seed + i)) errors++;
}
static void churn(void) {
	if (ncr == 8) { munmap(cr[0].p, cr[0].n * PG); memmove(cr, cr + 1, 7 * sizeof cr[0]); ncr--; }
	size_t n = 1 + xr() % 64;
	uint64_t *p = mmap(NULL, n * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) { errors++; return; }
	uint64_t seed = xr();
	for (size_t i = 0; i < n; i++) fill(p + i * W, seed + i);
	cr[ncr++] = (struct creg){ p, n, seed };
	/* heap: grow or shrink (never below 0) */
	if (!heap0) heap0 = sbrk(0);
	long d = (long)(xr() % 33) - 16;
	if (d < 0 && (size_t)-d > heap_pages) d = -(long)heap_pages;
	if (d != 0 && sbrk(d * PG) == (void *)-1) { errors++; return; }
	size_t old = heap_pages;
	heap_pages += d;
	for (size_t i = old; i < heap_pages; i++) fill(heap0 + i * W, heap_seed + i);
	churned++;
}

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
static const char *status_path;
static void status(unsigned long tick) {
	char buf[512];
	int n = snprintf(buf, sizeof buf, "tick=%lu errors=%lu region=%lu pages=%zu writes=%lu verified=%lu churn=%lu pid=%d\n",
			 tick, errors, (unsigned long)region, npages, writes, verified, churned, getpid());
	if (write_status(status_path, buf, n)) errors++;
}

static uint64_t *mreg; static size_t mreg_n;
static void command(char *line) {
	char c = line[0];
	long n = atol(line + 1);
	if (c == 'w') {
		static size_t next;
		for (long k = 0; k < n; k++) { next = (next + 7) % npages; write_page(next); printf("p %zu\n", next); }
	} else if (c == 'm') {
		mreg_n = n;
		mreg = mmap(NULL, n * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		printf("m %lu", (unsigned long)mreg);
		for (long i = 0; i < n; i += 2) { mreg[i * W] = i + 1; printf(" %ld", i); }
		printf("\n");
	} else if (c == 'u') {
		munmap(mreg, mreg_n * PG);
	} else if (c == 'b') {
		if (!heap0) heap0 = sbrk(0);
		uint64_t *p = sbrk(n * PG);
		for (long i = 0; i < n; i++) fill(p + i * W, heap_seed + heap_pages + i);
		heap_pages += n;
		printf("b %lu\n", (unsigned long)p);
	} else if (c == 's') {
		if ((size_t)n > heap_pages) n = heap_pages;
		sbrk(-n * PG);
		heap_pages -= n;
	}
	printf("done\n");
	fflush(stdout);
}

int main(int argc, char **argv) {
	if (argc < 5) return 2;
	status_path = argv[1];
	npages = (size_t)atol(argv[2]) * 256;
	double rate = atof(argv[3]);
	int do_churn = atoi(argv[4]);
	region = mmap(NULL, npages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	gen = calloc(npages, sizeof *gen);
	for (size_t i = 0; i < npages; i++) write_page(i);
	writes = 0;
	fcntl(0, F_SETFL, O_NONBLOCK);
	double t0 = now(), last_status = 0, credit = 0, last = t0, last_churn = t0;
	size_t vcur = 0, wcur = 0;
	for (unsigned long tick = 0;; tick++) {
		double t = now();
		credit += (t - last) * rate; last = t;
		while (credit >= 1) { wcur = (wcur + 4099) % npages; write_page(wcur); credit -= 1; }
		for (int k = 0; k < 64; k++) { verify_page(vcur); vcur = (vcur + 1) % npages; }
		if (do_churn && t - last_churn > 0.005) { churn(); churn_verify(); last_churn = t; }
		poll_commands(command);
		if (t - last_status > 0.01) { status(tick); last_status = t; }
		usleep(200);
	}
}
