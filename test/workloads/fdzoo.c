/* fdzoo — holds one fd of each kind and verifies each (without consuming state) every tick.
 *
 * Usage: fdzoo --status FILE [--dir DIR] [--tcp-port N] [--no-inotify]
 *   --dir DIR     where fdzoo-regular, fdzoo-ghost (unlinked) and fdzoo-fifo are created
 *                 (default: a new mkdtemp /tmp/fdzoo.XXXXXX). Files are left in place on exit.
 *   --tcp-port N  TCP listen port on 127.0.0.1 (default 0 = kernel-chosen)
 *   --no-inotify  skip the inotify fd (so the process is fully movable)
 *
 * Kinds (fd_<kind>=N keys in both the ready line and the status line):
 *   regular   DIR/fdzoo-regular O_RDWR, content "hello", offset 3
 *   deleted   DIR/fdzoo-ghost O_RDWR, content "ghost", offset 5, unlinked (nlink 0)
 *   dir       DIR opened O_RDONLY|O_DIRECTORY
 *   pipe_r / pipe_w  pipe, 5 bytes "pipe!" buffered unread
 *   fifo      DIR/fdzoo-fifo opened O_RDWR, 3 bytes "fif" buffered
 *   eventfd   counter 7, EFD_NONBLOCK
 *   epoll     watches eventfd (data.u64 0xE1E1) and pipe_r (data.u64 0xB2B2), level-triggered EPOLLIN
 *   signalfd  mask {SIGUSR2}; SIGUSR2 blocked in the process
 *   timerfd   CLOCK_MONOTONIC, value 10 s, interval 5 s
 *   inotify   watching DIR (IN_CREATE|IN_DELETE)   [absent with --no-inotify]
 *   memfd     "tern-memfd", 4096 bytes of pattern
 *   unix_a / unix_b  AF_UNIX stream socketpair, 4 bytes "unix" in flight a->b
 *   tcp       TCP listener on 127.0.0.1 (key tcp_port)
 *   udp       UDP socket bound to 127.0.0.1 (key udp_port)
 *   devnull   /dev/null O_WRONLY
 *   urandom   /dev/urandom O_RDONLY
 * Checks per tick: /proc/self/fd link kind, offsets (lseek SEEK_CUR), sizes, pread content, FIONREAD
 * byte counts, MSG_PEEK content, fdinfo (eventfd count, signalfd mask, inotify watch), epoll_wait(0)
 * reporting exactly the two expected tags, timerfd_gettime, socket names/ports, SO_ACCEPTCONN,
 * device numbers, access modes, O_NONBLOCK flags, and that SIGUSR2 is still blocked.
 * Status keys: tick errors phase dir tcp_port udp_port checks fd_<kind>...
 */
#include "wl.h"
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/timerfd.h>

enum {
	K_REGULAR, K_DELETED, K_DIR, K_PIPE_R, K_PIPE_W, K_FIFO, K_EVENTFD, K_EPOLL, K_SIGNALFD, K_TIMERFD,
	K_INOTIFY, K_MEMFD, K_UNIX_A, K_UNIX_B, K_TCP, K_UDP, K_DEVNULL, K_URANDOM, NK
};
static const char *kname[NK] = {"regular", "deleted", "dir",   "pipe_r", "pipe_w",  "fifo",
				"eventfd", "epoll",   "signalfd", "timerfd", "inotify", "memfd",
				"unix_a",  "unix_b",  "tcp",   "udp",    "devnull", "urandom"};
static int fd[NK];
static char dir[1024], regpath[1100], fifopath[1100];
static int tcp_port, udp_port;
static unsigned char memfd_pat[4096];

#define DIE(what)                                                                                    \
	do {                                                                                         \
		perror("fdzoo: " what);                                                              \
		exit(2);                                                                             \
	} while (0)

static int fdinfo_get(int f, const char *key, char *out, size_t cap)
{
	char p[64], buf[4096];
	snprintf(p, sizeof p, "/proc/self/fdinfo/%d", f);
	int pf = open(p, O_RDONLY | O_CLOEXEC);
	if (pf < 0) return -1;
	ssize_t n = read(pf, buf, sizeof buf - 1);
	close(pf);
	if (n <= 0) return -1;
	buf[n] = 0;
	char *s = strstr(buf, key);
	if (!s) return -1;
	s += strlen(key);
	while (*s == ' ' || *s == '\t' || *s == ':') s++;
	size_t i = 0;
	while (s[i] && s[i] != '\n' && i + 1 < cap) out[i] = s[i], i++;
	out[i] = 0;
	return 0;
}

static void check_link(int k, const char *want_prefix, const char *want_suffix)
{
	char p[64], l[1200];
	snprintf(p, sizeof p, "/proc/self/fd/%d", fd[k]);
	ssize_t n = readlink(p, l, sizeof l - 1);
	if (n < 0) {
		wl_error("%s-fd%d-readlink errno=%d", kname[k], fd[k], errno);
		return;
	}
	l[n] = 0;
	size_t sl = want_suffix ? strlen(want_suffix) : 0;
	if (strncmp(l, want_prefix, strlen(want_prefix)) ||
	    (sl && ((size_t)n < sl || strcmp(l + n - sl, want_suffix))))
		wl_error("%s-fd%d-link got=%s want=%s*%s", kname[k], fd[k], l, want_prefix, want_suffix ? want_suffix : "");
}

static void check_offset(int k, off_t want)
{
	off_t o = lseek(fd[k], 0, SEEK_CUR);
	if (o != want) wl_error("%s-offset got=%lld want=%lld errno=%d", kname[k], (long long)o, (long long)want, errno);
}

static void check_content(int k, const void *want, size_t len)
{
	char buf[4096];
	struct stat st;
	if (fstat(fd[k], &st) || (size_t)st.st_size != len)
		wl_error("%s-size got=%lld want=%zu", kname[k], (long long)st.st_size, len);
	ssize_t n = pread(fd[k], buf, len, 0);
	if (n != (ssize_t)len || memcmp(buf, want, len)) wl_error("%s-content-mismatch n=%zd", kname[k], n);
}

static void check_inq(int k, int want)
{
	int n = -1;
	if (ioctl(fd[k], FIONREAD, &n) || n != want) wl_error("%s-FIONREAD got=%d want=%d errno=%d", kname[k], n, want, errno);
}

static void check_port(int k, int want_type, int want_port)
{
	struct sockaddr_in a;
	socklen_t al = sizeof a;
	int type = 0;
	socklen_t tl = sizeof type;
	if (getsockname(fd[k], (struct sockaddr *)&a, &al) || a.sin_family != AF_INET ||
	    a.sin_addr.s_addr != htonl(INADDR_LOOPBACK) || ntohs(a.sin_port) != want_port)
		wl_error("%s-sockname-mismatch port=%d want=%d errno=%d", kname[k], ntohs(a.sin_port), want_port, errno);
	if (getsockopt(fd[k], SOL_SOCKET, SO_TYPE, &type, &tl) || type != want_type)
		wl_error("%s-SO_TYPE got=%d", kname[k], type);
}

static void check_rdev(int k, unsigned maj, unsigned min, int accmode)
{
	struct stat st;
	if (fstat(fd[k], &st) || !S_ISCHR(st.st_mode) || st.st_rdev != makedev(maj, min))
		wl_error("%s-not-chardev-%u:%u", kname[k], maj, min);
	int fl = fcntl(fd[k], F_GETFL);
	if (fl < 0 || (fl & O_ACCMODE) != accmode) wl_error("%s-accmode got=0x%x", kname[k], fl);
}

static void verify_all(void)
{
	char v[256];
	struct stat st;

	/* regular */
	check_link(K_REGULAR, regpath, NULL);
	check_content(K_REGULAR, "hello", 5);
	check_offset(K_REGULAR, 3);
	/* deleted */
	check_link(K_DELETED, "/", " (deleted)");
	check_content(K_DELETED, "ghost", 5);
	check_offset(K_DELETED, 5);
	if (fstat(fd[K_DELETED], &st) || st.st_nlink != 0) wl_error("deleted-nlink got=%lu", (unsigned long)st.st_nlink);
	/* dir */
	if (fstat(fd[K_DIR], &st) || !S_ISDIR(st.st_mode)) wl_error("dir-not-directory");
	check_link(K_DIR, dir, NULL);
	/* pipe */
	check_link(K_PIPE_R, "pipe:[", NULL);
	check_link(K_PIPE_W, "pipe:[", NULL);
	{
		struct stat a, b;
		if (fstat(fd[K_PIPE_R], &a) || fstat(fd[K_PIPE_W], &b) || a.st_ino != b.st_ino)
			wl_error("pipe-ends-differ");
	}
	check_inq(K_PIPE_R, 5);
	/* fifo */
	check_link(K_FIFO, fifopath, NULL);
	if (fstat(fd[K_FIFO], &st) || !S_ISFIFO(st.st_mode)) wl_error("fifo-not-fifo");
	check_inq(K_FIFO, 3);
	/* eventfd */
	check_link(K_EVENTFD, "anon_inode:[eventfd]", NULL);
	if (fdinfo_get(fd[K_EVENTFD], "eventfd-count", v, sizeof v) || strtoull(v, NULL, 16) != 7)
		wl_error("eventfd-count got=%s want=7", v);
	if (!(fcntl(fd[K_EVENTFD], F_GETFL) & O_NONBLOCK)) wl_error("eventfd-not-nonblock");
	/* epoll */
	check_link(K_EPOLL, "anon_inode:[eventpoll]", NULL);
	{
		struct epoll_event ev[8];
		int n = epoll_wait(fd[K_EPOLL], ev, 8, 0);
		int seen_e = 0, seen_p = 0;
		for (int i = 0; i < n; i++) {
			if (ev[i].data.u64 == 0xE1E1) seen_e++;
			else if (ev[i].data.u64 == 0xB2B2) seen_p++;
		}
		if (n != 2 || seen_e != 1 || seen_p != 1)
			wl_error("epoll-ready n=%d eventfd=%d pipe=%d errno=%d", n, seen_e, seen_p, n < 0 ? errno : 0);
	}
	/* signalfd */
	check_link(K_SIGNALFD, "anon_inode:[signalfd]", NULL);
	if (fdinfo_get(fd[K_SIGNALFD], "sigmask", v, sizeof v) || strtoull(v, NULL, 16) != (1ull << (SIGUSR2 - 1)))
		wl_error("signalfd-sigmask got=%s", v);
	{
		sigset_t cur;
		pthread_sigmask(SIG_BLOCK, NULL, &cur);
		if (!sigismember(&cur, SIGUSR2)) wl_error("SIGUSR2-not-blocked");
	}
	/* timerfd */
	check_link(K_TIMERFD, "anon_inode:[timerfd]", NULL);
	{
		struct itimerspec it;
		if (timerfd_gettime(fd[K_TIMERFD], &it) || it.it_interval.tv_sec != 5 || it.it_interval.tv_nsec != 0 ||
		    (it.it_value.tv_sec == 0 && it.it_value.tv_nsec == 0) || it.it_value.tv_sec > 10)
			wl_error("timerfd-gettime value=%ld.%09ld interval=%ld.%09ld", (long)it.it_value.tv_sec,
				 it.it_value.tv_nsec, (long)it.it_interval.tv_sec, it.it_interval.tv_nsec);
		if (fdinfo_get(fd[K_TIMERFD], "clockid", v, sizeof v) || atoi(v) != CLOCK_MONOTONIC)
			wl_error("timerfd-clockid got=%s", v);
	}
	/* inotify */
	if (fd[K_INOTIFY] >= 0) {
		check_link(K_INOTIFY, "anon_inode:inotify", NULL);
		if (fdinfo_get(fd[K_INOTIFY], "inotify wd", v, sizeof v)) wl_error("inotify-no-watch");
	}
	/* memfd */
	check_link(K_MEMFD, "/memfd:tern-memfd", NULL);
	check_content(K_MEMFD, memfd_pat, sizeof memfd_pat);
	/* unix socketpair */
	check_link(K_UNIX_A, "socket:[", NULL);
	check_link(K_UNIX_B, "socket:[", NULL);
	check_inq(K_UNIX_B, 4);
	{
		char b[8];
		ssize_t n = recv(fd[K_UNIX_B], b, sizeof b, MSG_PEEK | MSG_DONTWAIT);
		if (n != 4 || memcmp(b, "unix", 4)) wl_error("unix-peek n=%zd", n);
		int n2 = 0;
		if (ioctl(fd[K_UNIX_A], FIONREAD, &n2) || n2 != 0) wl_error("unix_a-FIONREAD got=%d want=0", n2);
	}
	/* tcp / udp */
	check_link(K_TCP, "socket:[", NULL);
	check_port(K_TCP, SOCK_STREAM, tcp_port);
	{
		int acc = 0;
		socklen_t l = sizeof acc;
		if (getsockopt(fd[K_TCP], SOL_SOCKET, SO_ACCEPTCONN, &acc, &l) || acc != 1) wl_error("tcp-not-listening");
	}
	check_link(K_UDP, "socket:[", NULL);
	check_port(K_UDP, SOCK_DGRAM, udp_port);
	/* devices */
	check_link(K_DEVNULL, "/dev/null", NULL);
	check_rdev(K_DEVNULL, 1, 3, O_WRONLY);
	check_link(K_URANDOM, "/dev/urandom", NULL);
	check_rdev(K_URANDOM, 1, 9, O_RDONLY);
}

static int must(int r, const char *what)
{
	if (r < 0) {
		fprintf(stderr, "fdzoo: %s: %s\n", what, strerror(errno));
		exit(2);
	}
	return r;
}

int main(int argc, char **argv)
{
	int want_inotify = 1, want_tcp = 0;
	wl_init(argc, argv);
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--status")) i++;
		else if (!strcmp(argv[i], "--dir") && i + 1 < argc) snprintf(dir, sizeof dir, "%s", argv[++i]);
		else if (!strcmp(argv[i], "--tcp-port") && i + 1 < argc) want_tcp = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--no-inotify")) want_inotify = 0;
		else {
			fprintf(stderr, "fdzoo: unknown argument %s\n", argv[i]);
			return 2;
		}
	}
	if (!*dir) {
		strcpy(dir, "/tmp/fdzoo.XXXXXX");
		if (!mkdtemp(dir)) DIE("mkdtemp");
	}
	{ /* canonical absolute path so /proc/self/fd links compare equal */
		char *r = realpath(dir, NULL);
		if (!r) DIE("realpath --dir");
		snprintf(dir, sizeof dir, "%s", r);
		free(r);
	}
	snprintf(regpath, sizeof regpath, "%s/fdzoo-regular", dir);
	snprintf(fifopath, sizeof fifopath, "%s/fdzoo-fifo", dir);
	char ghost[1100];
	snprintf(ghost, sizeof ghost, "%s/fdzoo-ghost", dir);
	for (int k = 0; k < NK; k++) fd[k] = -1;

	fd[K_REGULAR] = must(open(regpath, O_RDWR | O_CREAT | O_TRUNC, 0644), "open regular");
	must(write(fd[K_REGULAR], "hello", 5) == 5 ? 0 : -1, "write regular");
	must(lseek(fd[K_REGULAR], 3, SEEK_SET) == 3 ? 0 : -1, "lseek regular");

	fd[K_DELETED] = must(open(ghost, O_RDWR | O_CREAT | O_TRUNC, 0644), "open ghost");
	must(write(fd[K_DELETED], "ghost", 5) == 5 ? 0 : -1, "write ghost");
	must(unlink(ghost), "unlink ghost");

	fd[K_DIR] = must(open(dir, O_RDONLY | O_DIRECTORY), "open dir");

	int p[2];
	must(pipe(p), "pipe");
	fd[K_PIPE_R] = p[0], fd[K_PIPE_W] = p[1];
	must(write(p[1], "pipe!", 5) == 5 ? 0 : -1, "write pipe");

	unlink(fifopath);
	must(mkfifo(fifopath, 0644), "mkfifo");
	fd[K_FIFO] = must(open(fifopath, O_RDWR), "open fifo");
	must(write(fd[K_FIFO], "fif", 3) == 3 ? 0 : -1, "write fifo");

	fd[K_EVENTFD] = must(eventfd(7, EFD_NONBLOCK), "eventfd");

	fd[K_EPOLL] = must(epoll_create1(0), "epoll_create1");
	struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 0xE1E1};
	must(epoll_ctl(fd[K_EPOLL], EPOLL_CTL_ADD, fd[K_EVENTFD], &ev), "epoll_ctl eventfd");
	ev.data.u64 = 0xB2B2;
	must(epoll_ctl(fd[K_EPOLL], EPOLL_CTL_ADD, fd[K_PIPE_R], &ev), "epoll_ctl pipe");

	sigset_t m;
	sigemptyset(&m);
	sigaddset(&m, SIGUSR2);
	pthread_sigmask(SIG_BLOCK, &m, NULL);
	fd[K_SIGNALFD] = must(signalfd(-1, &m, 0), "signalfd");

	fd[K_TIMERFD] = must(timerfd_create(CLOCK_MONOTONIC, 0), "timerfd_create");
	struct itimerspec it = {.it_interval = {5, 0}, .it_value = {10, 0}};
	must(timerfd_settime(fd[K_TIMERFD], 0, &it, NULL), "timerfd_settime");

	if (want_inotify) {
		fd[K_INOTIFY] = must(inotify_init1(0), "inotify_init1");
		must(inotify_add_watch(fd[K_INOTIFY], dir, IN_CREATE | IN_DELETE), "inotify_add_watch");
	}

	for (size_t i = 0; i < sizeof memfd_pat; i++) memfd_pat[i] = (unsigned char)(i * 7 + (i >> 8) * 13 + 1);
	fd[K_MEMFD] = must(memfd_create("tern-memfd", 0), "memfd_create");
	must(write(fd[K_MEMFD], memfd_pat, sizeof memfd_pat) == sizeof memfd_pat ? 0 : -1, "write memfd");

	int sv[2];
	must(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), "socketpair");
	fd[K_UNIX_A] = sv[0], fd[K_UNIX_B] = sv[1];
	must(write(sv[0], "unix", 4) == 4 ? 0 : -1, "write unix");

	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t al = sizeof a;
	int one = 1;
	fd[K_TCP] = must(socket(AF_INET, SOCK_STREAM, 0), "socket tcp");
	setsockopt(fd[K_TCP], SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	a.sin_port = htons(want_tcp);
	must(bind(fd[K_TCP], (struct sockaddr *)&a, sizeof a), "bind tcp");
	must(listen(fd[K_TCP], 16), "listen");
	must(getsockname(fd[K_TCP], (struct sockaddr *)&a, &al), "getsockname tcp");
	tcp_port = ntohs(a.sin_port);

	fd[K_UDP] = must(socket(AF_INET, SOCK_DGRAM, 0), "socket udp");
	a.sin_port = 0;
	must(bind(fd[K_UDP], (struct sockaddr *)&a, sizeof a), "bind udp");
	al = sizeof a;
	must(getsockname(fd[K_UDP], (struct sockaddr *)&a, &al), "getsockname udp");
	udp_port = ntohs(a.sin_port);

	fd[K_DEVNULL] = must(open("/dev/null", O_WRONLY), "open /dev/null");
	fd[K_URANDOM] = must(open("/dev/urandom", O_RDONLY), "open /dev/urandom");

	char extra[2048] = "";
	wl_append(extra, sizeof extra, "dir=%s tcp_port=%d udp_port=%d", dir, tcp_port, udp_port);
	for (int k = 0; k < NK; k++)
		if (fd[k] >= 0) wl_append(extra, sizeof extra, " fd_%s=%d", kname[k], fd[k]);

	verify_all();
	uint64_t checks = 1;
	char st[2300];
	snprintf(st, sizeof st, "%s checks=%llu", extra, (unsigned long long)checks);
	wl_write_status("running", 0, st);
	wl_ready(extra);
	for (uint64_t tick = 1;; tick++) {
		verify_all();
		checks++;
		snprintf(st, sizeof st, "%s checks=%llu", extra, (unsigned long long)checks);
		if (wl_term) wl_exit(tick, st);
		wl_write_status("running", tick, st);
		wl_sleep_ms(50);
	}
}
