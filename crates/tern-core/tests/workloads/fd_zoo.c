/* fd_zoo: holds one file descriptor of every kind Tern's inspector classifies, prints
 * "name value" lines describing them, then "ready", then sleeps until killed.
 * Used by tests/inspect.rs; compiled at test time with cc.
 * argv[1] = scratch directory (for the fifo, the regular and the deleted file).
 * argv[2] (optional) = "fork": also keep a child process (dies with us via PDEATHSIG). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/netlink.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/shm.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <unistd.h>

static void die(const char *what) { perror(what); exit(1); }
static void out(const char *name, long value) { printf("%s %ld\n", name, value); }

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: fd_zoo DIR [fork]\n"); return 2; }
    const char *dir = argv[1];
    char path[4096];

    int p[2];
    if (pipe(p)) die("pipe");
    out("pipe_read", p[0]); out("pipe_write", p[1]);
    if (write(p[1], "hello", 5) != 5) die("write pipe");

    snprintf(path, sizeof path, "%s/fifo", dir);
    if (mkfifo(path, 0600)) die("mkfifo");
    int fifo = open(path, O_RDWR); /* O_RDWR: does not block waiting for a peer */
    if (fifo < 0) die("open fifo");
    out("fifo", fifo);

    int efd = eventfd(42, EFD_NONBLOCK); /* fdinfo shows the count in hex: 2a */
    if (efd < 0) die("eventfd");
    out("eventfd", efd);

    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll");
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 0x1111};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, efd, &ev)) die("epoll_ctl efd");
    ev.events = EPOLLIN | EPOLLOUT; ev.data.u64 = 0x2222;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &ev)) die("epoll_ctl pipe");
    out("epoll", ep);

    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    if (tfd < 0) die("timerfd");
    struct itimerspec its = {.it_value = {1000, 0}, .it_interval = {2, 500000000}};
    if (timerfd_settime(tfd, 0, &its, NULL)) die("timerfd_settime");
    out("timerfd", tfd);

    sigset_t mask; sigemptyset(&mask); sigaddset(&mask, SIGUSR1); sigaddset(&mask, SIGUSR2);
    if (sigprocmask(SIG_BLOCK, &mask, NULL)) die("sigprocmask");
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK);
    if (sfd < 0) die("signalfd");
    out("signalfd", sfd);

    int ino = inotify_init1(IN_NONBLOCK);
    if (ino < 0) die("inotify");
    if (inotify_add_watch(ino, dir, IN_CREATE | IN_DELETE) < 0) die("inotify_add_watch");
    out("inotify", ino);

    int mfd = memfd_create("tern-zoo", MFD_CLOEXEC);
    if (mfd < 0) die("memfd");
    if (ftruncate(mfd, 8192)) die("ftruncate memfd");
    out("memfd", mfd);

    int sp[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sp)) die("socketpair");
    out("unix_a", sp[0]); out("unix_b", sp[1]);

    int ul = socket(AF_UNIX, SOCK_SEQPACKET, 0);
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    snprintf(sun.sun_path, sizeof sun.sun_path, "%s/sock", dir);
    if (bind(ul, (struct sockaddr *)&sun, sizeof sun) || listen(ul, 4)) die("unix listen");
    out("unix_listen", ul);

    int tl = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof sin;
    if (bind(tl, (struct sockaddr *)&sin, sizeof sin) || listen(tl, 4)) die("tcp listen");
    getsockname(tl, (struct sockaddr *)&sin, &sl);
    out("tcp_listen", tl); out("tcp_port", ntohs(sin.sin_port));

    int tc = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(tc, (struct sockaddr *)&sin, sizeof sin)) die("tcp connect");
    int ta = accept(tl, NULL, NULL);
    if (ta < 0) die("accept");
    struct sockaddr_in cin; sl = sizeof cin;
    getsockname(tc, (struct sockaddr *)&cin, &sl);
    out("tcp_client", tc); out("tcp_client_port", ntohs(cin.sin_port)); out("tcp_accepted", ta);

    int t6 = socket(AF_INET6, SOCK_STREAM, 0);
    struct sockaddr_in6 s6 = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    if (t6 >= 0 && bind(t6, (struct sockaddr *)&s6, sizeof s6) == 0 && listen(t6, 4) == 0) {
        sl = sizeof s6; getsockname(t6, (struct sockaddr *)&s6, &sl);
        out("tcp6_listen", t6); out("tcp6_port", ntohs(s6.sin6_port));
    }

    int us = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in uin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    sl = sizeof uin;
    if (bind(us, (struct sockaddr *)&uin, sizeof uin)) die("udp bind");
    getsockname(us, (struct sockaddr *)&uin, &sl);
    out("udp", us); out("udp_port", ntohs(uin.sin_port));

    int nl = socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE);
    if (nl < 0) die("netlink");
    out("netlink", nl);

    int dn = open("/dev/null", O_RDWR);
    out("devnull", dn);

    snprintf(path, sizeof path, "%s/regular", dir);
    int rf = open(path, O_RDWR | O_CREAT | O_APPEND, 0600);
    char buf[10000]; memset(buf, 'x', sizeof buf);
    if (rf < 0 || write(rf, buf, sizeof buf) != sizeof buf) die("regular");
    if (lseek(rf, 1234, SEEK_SET) != 1234) die("lseek");
    out("regular", rf);

    snprintf(path, sizeof path, "%s/deleted", dir);
    int df = open(path, O_RDWR | O_CREAT, 0600);
    if (df < 0 || write(df, buf, 100) != 100 || unlink(path)) die("deleted");
    out("deleted", df);

    int dirfd = open(dir, O_RDONLY | O_DIRECTORY);
    out("directory", dirfd);

    /* io_uring_setup(2): struct io_uring_params is 120 bytes; zeroed means defaults. */
    unsigned char params[120]; memset(params, 0, sizeof params);
    long ur = syscall(425, 4, params);
    if (ur < 0) die("io_uring_setup");
    out("io_uring", ur);

    void *shared = mmap(NULL, 3 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    void *guard = mmap(NULL, 5 * 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (shared == MAP_FAILED || guard == MAP_FAILED) die("mmap");
    out("shared_anon", (long)shared); out("guard", (long)guard);

    int shm = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600);
    void *shmp = shm >= 0 ? shmat(shm, NULL, 0) : (void *)-1;
    if (shmp == (void *)-1) die("shm");
    shmctl(shm, IPC_RMID, NULL); /* destroyed when we detach/exit: nothing leaks */
    out("sysv_shm", (long)shmp);

    if (argc > 2 && strcmp(argv[2], "fork") == 0) {
        pid_t child = fork();
        if (child < 0) die("fork");
        if (child == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (getppid() == 1) _exit(0);
            for (;;) pause();
        }
        out("child", child);
    }

    printf("ready\n");
    fflush(stdout);
    for (;;) pause();
}
