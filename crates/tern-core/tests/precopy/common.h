/* Shared by the pre-copy fixtures (fixture.c, stale.c): the page pattern, the status file and the
 * stdin command channel. Included by path next to them (cc finds it in the including file's
 * directory), so each fixture still builds from its one source file. */
#ifndef PRECOPY_COMMON_H
#define PRECOPY_COMMON_H

#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <unistd.h>

#define PG 4096
#define W (PG / 8)

static uint64_t mix(uint64_t a, uint64_t b) {
	uint64_t x = a * 0x9E3779B97F4A7C15ull ^ (b + 0x632BE59BD9B4E019ull);
	x ^= x >> 31; x *= 0xBF58476D1CE4E5B9ull; x ^= x >> 29;
	return x;
}
static void fill(uint64_t *p, uint64_t seed) { for (int j = 0; j < W; j++) p[j] = mix(seed, j); }

/* Replaces the status file at `path` atomically with buf[0..n) (written to PATH.tmp, renamed).
 * Returns -1 when the write came up short (the fixture counts an error), else 0 (a failed open
 * is no error: the next status will try again). */
static int write_status(const char *path, const char *buf, int n) {
	char tmp[4096];
	snprintf(tmp, sizeof tmp, "%s.tmp", path);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0) return 0;
	int short_write = write(fd, buf, n) != n;
	close(fd);
	rename(tmp, path);
	return short_write ? -1 : 0;
}

/* stdin is made non-blocking by the fixture; this takes whatever arrived and runs `command` on
 * each complete line (a partial line waits for the next call; longer lines are cut at 255). */
static void poll_commands(void (*command)(char *line)) {
	static char line[256];
	static size_t ll;
	struct pollfd p = { .fd = 0, .events = POLLIN };
	if (poll(&p, 1, 0) > 0) {
		char c;
		while (read(0, &c, 1) == 1) {
			if (c == '\n') { line[ll] = 0; command(line); ll = 0; }
			else if (ll < sizeof line - 1) line[ll++] = c;
		}
	}
}

#endif
