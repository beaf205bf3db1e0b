/* wl.h — shared helpers for Tern's self-verifying test workloads (zdtm-style).
 *
 * STATUS PROTOCOL (every workload in test/workloads follows it)
 *
 *   Usage:  NAME --status FILE [workload options]
 *
 *   - FILE holds exactly one line of space-separated `key=value` pairs, rewritten atomically
 *     (write FILE.tmp, then rename) at least every 100 ms, e.g.
 *         pid=123 tick=456 errors=0 phase=running verified_pages=16384 ...
 *     Values never contain spaces. Common keys:
 *         pid      getpid()
 *         tick     main-loop iterations (monotonic)
 *         errors   number of self-check failures seen so far (0 = intact)
 *         phase    starting | running | exiting
 *         lasterror  present only once errors>0: description of the FIRST failure (no spaces)
 *     plus workload-specific keys.
 *   - On the first failure the description is also written to stderr.
 *   - Once fully set up, the workload prints `ready pid=<pid> [extra keys]` on stdout (flushed).
 *     The status file exists (phase=running) before the ready line is printed.
 *   - On SIGTERM: final status write with phase=exiting, exit 0 if errors==0 else 1.
 *   - Verification runs continuously; there is no separate verify command.
 */
#ifndef TERN_WL_H
#define TERN_WL_H
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *wl_status_path;
static char wl_status_tmp[4096];
static volatile sig_atomic_t wl_term;
static volatile uint64_t wl_errors; /* updated with __atomic ops */
static char wl_lasterror[256];
static int wl_lasterror_set;

static inline uint64_t wl_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void wl_on_term(int sig)
{
	(void)sig;
	wl_term = 1;
}

/* Record a self-check failure. Thread-safe enough: only the first message is kept. */
__attribute__((format(printf, 1, 2))) static inline void wl_error(const char *fmt, ...)
{
	uint64_t n = __atomic_add_fetch(&wl_errors, 1, __ATOMIC_SEQ_CST);
	if (n != 1) return;
	char buf[256];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	for (char *p = buf; *p; p++)
		if (*p == ' ' || *p == '\t' || *p == '\n' || *p == '=') *p = '_';
	memcpy(wl_lasterror, buf, sizeof buf);
	__atomic_store_n(&wl_lasterror_set, 1, __ATOMIC_RELEASE);
	fprintf(stderr, "ERROR: %s\n", buf);
}

static inline uint64_t wl_nerrors(void) { return __atomic_load_n(&wl_errors, __ATOMIC_SEQ_CST); }

/* Parse `--status FILE` (required) out of argv; other args are left to the caller.
 * Installs the SIGTERM handler (no SA_RESTART so blocking calls in main return). */
static inline void wl_init(int argc, char **argv)
{
	for (int i = 1; i < argc - 1; i++)
		if (!strcmp(argv[i], "--status")) wl_status_path = argv[i + 1];
	if (!wl_status_path) {
		fprintf(stderr, "usage: %s --status FILE [options]\n", argv[0]);
		exit(2);
	}
	snprintf(wl_status_tmp, sizeof wl_status_tmp, "%s.tmp", wl_status_path);
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = wl_on_term;
	sigaction(SIGTERM, &sa, NULL);
}

/* Write the status line: common keys + `extra` (may be NULL or ""). */
static inline void wl_write_status(const char *phase, uint64_t tick, const char *extra)
{
	char line[8192];
	int n = snprintf(line, sizeof line, "pid=%d tick=%llu errors=%llu phase=%s", (int)getpid(),
			 (unsigned long long)tick, (unsigned long long)wl_nerrors(), phase);
	if (extra && *extra) n += snprintf(line + n, sizeof line - n, " %s", extra);
	if (__atomic_load_n(&wl_lasterror_set, __ATOMIC_ACQUIRE))
		n += snprintf(line + n, sizeof line - n, " lasterror=%s", wl_lasterror);
	if (n > (int)sizeof line - 2) n = sizeof line - 2;
	line[n++] = '\n';
	FILE *f = fopen(wl_status_tmp, "w");
	if (!f) return;
	fwrite(line, 1, n, f);
	fclose(f);
	rename(wl_status_tmp, wl_status_path);
}

static inline void wl_ready(const char *extra)
{
	printf("ready pid=%d%s%s\n", (int)getpid(), extra && *extra ? " " : "", extra ? extra : "");
	fflush(stdout);
}

/* Final write + exit; call from main when wl_term is set. */
static inline __attribute__((noreturn)) void wl_exit(uint64_t tick, const char *extra)
{
	wl_write_status("exiting", tick, extra);
	exit(wl_nerrors() ? 1 : 0);
}

/* Sleep for ms milliseconds (returns early on signal; that is fine for main loops). */
static inline void wl_sleep_ms(long ms)
{
	struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
	nanosleep(&ts, NULL);
}

/* Append printf-formatted text to a buffer. */
__attribute__((format(printf, 3, 4))) static inline void wl_append(char *buf, size_t cap, const char *fmt, ...)
{
	size_t n = strlen(buf);
	if (n >= cap) return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf + n, cap - n, fmt, ap);
	va_end(ap);
}

/* splitmix64's finaliser: the deterministic content of memcheck's pages and tcpstream's streams,
 * so that any byte can be recomputed from its position alone. */
static inline uint64_t mix(uint64_t x)
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ull;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebull;
	x ^= x >> 31;
	return x;
}

#endif
