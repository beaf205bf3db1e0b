// Lazy-restore fixture: a region of MIB MiB whose pages describe themselves, then, once the test
// creates TRIGGER (right after the restore, before the lazy fill is done), it changes its memory
// the ways lazy memory must survive, and checks the result; after TRIGGER.2 (memory home) it
// checks everything again.
//   discard: MADV_DONTNEED the last eighth -> must read zeros; munmap the 7th eighth and map it
//            again -> zeros; mremap 64 pages of the 6th eighth elsewhere -> their data moved.
//   fork:    MADV_DONTNEED the last eighth, fork; the child checks the whole region (zeros in
//            the discarded part), writes STATUS.child; the parent checks too.
//   forkslow: fork at once (nothing discarded); parent and child each check the region slowly,
//            a page every 500 µs, over and over, forever (so most of it stays lazy for a while),
//            writing STATUS (phase=parent-running) and STATUS.child (phase=child-running) every
//            64 pages and at once on a wrong page. Never reaches TRIGGER.2.
// Status (one line, key=value): phase, errors, lasterror, pid, region, pages, checked.
// Usage: fixture STATUS TRIGGER MIB MODE
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define PG 4096UL
static const char *status_path;
static char *region;
static size_t pages;
static long errors;
static char lasterror[128] = "none";
static const char *phase = "start";
static char *moved;
static long checked;

static uint64_t word(size_t page, size_t j) { return (page * 0x9E3779B97F4A7C15ull) ^ (j * 0x100000001b3ull) ^ 0x5a5a; }

static void fill(size_t page) {
	uint64_t *w = (uint64_t *)(region + page * PG);
	for (size_t j = 0; j < PG / 8; j++) w[j] = word(page, j);
}

static void error(const char *what, size_t page) {
	if (errors++ == 0) snprintf(lasterror, sizeof lasterror, "%s-page-%zu", what, page);
}

static void check_pattern(const char *base, size_t page_index) {
	const uint64_t *w = (const uint64_t *)base;
	for (size_t j = 0; j < PG / 8; j++)
		if (w[j] != word(page_index, j)) { error("pattern", page_index); return; }
}

static void check_zero(const char *base, size_t page_index) {
	const uint64_t *w = (const uint64_t *)base;
	for (size_t j = 0; j < PG / 8; j++)
		if (w[j]) { error("not-zero", page_index); return; }
}

static void status(const char *path) {
	char tmp[4096];
	snprintf(tmp, sizeof tmp, "%s.tmp", path);
	FILE *f = fopen(tmp, "w");
	if (!f) return;
	fprintf(f, "pid=%d phase=%s errors=%ld lasterror=%s region=%p pages=%zu checked=%ld\n", getpid(), phase, errors, lasterror, region, pages, checked);
	fclose(f);
	rename(tmp, path);
}

static void wait_file(const char *path) {
	while (access(path, F_OK) != 0) usleep(300);
}

// The region's expected state after the changes: 0 = pattern, 1 = zero, 2 = unmapped/moved.
static int expect(size_t p, int mode) {
	size_t e = pages / 8;
	if (p >= 7 * e) return 1;
	if (mode == 0 && p >= 6 * e) return 1;
	if (mode == 0 && p >= 5 * e && p < 5 * e + 64) return 2;
	return 0;
}

static void verify(int mode) {
	for (size_t p = 0; p < pages; p++) {
		int x = expect(p, mode);
		if (x == 0) check_pattern(region + p * PG, p);
		else if (x == 1) check_zero(region + p * PG, p);
	}
	if (mode == 0)
		for (size_t k = 0; k < 64; k++) check_pattern(moved + k * PG, pages / 8 * 5 + k);
}

// forkslow: check page after page, slowly, forever; report every 64 pages and on a wrong one.
static void check_slowly(const char *path) {
	for (;;)
		for (size_t p = 0; p < pages; p++) {
			long before = errors;
			check_pattern(region + p * PG, p);
			checked++;
			if (errors != before || checked % 64 == 0) status(path);
			usleep(500);
		}
}

int main(int argc, char **argv) {
	if (argc < 5) return 2;
	status_path = argv[1];
	const char *trigger = argv[2];
	pages = (size_t)atol(argv[3]) * 256;
	int mode = strcmp(argv[4], "fork") == 0 ? 1 : 0;
	int slow = strcmp(argv[4], "forkslow") == 0;
	region = mmap(NULL, pages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (region == MAP_FAILED) return 2;
	for (size_t p = 0; p < pages; p++) fill(p);
	phase = "ready";
	status(status_path);
	wait_file(trigger);
	// Restored (the test creates the trigger after the restore): change the memory at once.
	if (slow) {
		pid_t child = fork();
		if (child < 0) error("fork", 0);
		char path[4096];
		snprintf(path, sizeof path, "%s.child", status_path);
		phase = child == 0 ? "child-running" : "parent-running";
		check_slowly(child == 0 ? path : status_path);
	}
	size_t e = pages / 8;
	if (madvise(region + 7 * e * PG, e * PG, MADV_DONTNEED)) error("madvise", 0);
	if (mode == 0) {
		char *at = region + 6 * e * PG;
		if (munmap(at, e * PG)) error("munmap", 0);
		if (mmap(at, e * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != at) error("remap-anon", 0);
		char *spot = mmap(NULL, 64 * PG, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		moved = mremap(region + 5 * e * PG, 64 * PG, 64 * PG, MREMAP_MAYMOVE | MREMAP_FIXED, spot);
		if (moved == MAP_FAILED) { error("mremap", 0); moved = NULL; }
		// The hole the mremap left: map it again so the later sweeps see a plain region.
		if (mmap(region + 5 * e * PG, 64 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED) error("refill", 0);
		verify(0);
		phase = "changed";
		status(status_path);
	} else {
		pid_t child = fork();
		if (child == 0) {
			verify(1);
			char path[4096];
			snprintf(path, sizeof path, "%s.child", status_path);
			phase = "child-done";
			status(path);
			_exit(errors ? 1 : 0);
		}
		verify(1);
		int st = 0;
		waitpid(child, &st, 0);
		if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) error("child", (size_t)st);
		phase = "changed";
		status(status_path);
	}
	char t2[4096];
	snprintf(t2, sizeof t2, "%s.2", trigger);
	wait_file(t2);
	verify(mode);
	phase = "verified";
	status(status_path);
	for (;;) pause();
}
