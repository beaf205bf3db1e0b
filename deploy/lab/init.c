/*
 * tern-lab-init: pid 1 of a Tern lab "host" (its own pid/mount/uts namespaces).
 *   tern-lab-init <hostname>
 * Sets the hostname, prints "ready\n" on stdout, then moves its stdio to /dev/null and reaps every
 * child (orphans of the pid namespace are reparented to it). On SIGTERM/SIGINT it SIGKILLs every
 * other process of the pid namespace (kill(-1) from a pid-ns init), reaps them and exits.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t stop_sig = 0;

static void on_term(int sig) { stop_sig = sig; }
static void on_chld(int sig) { (void)sig; }

int main(int argc, char **argv) {
	if (argc > 1 && sethostname(argv[1], strlen(argv[1])) < 0) {
		perror("tern-lab-init: sethostname");
		return 1;
	}

	sigset_t blocked, empty;
	sigemptyset(&empty);
	sigemptyset(&blocked);
	sigaddset(&blocked, SIGCHLD);
	sigaddset(&blocked, SIGTERM);
	sigaddset(&blocked, SIGINT);
	sigprocmask(SIG_BLOCK, &blocked, NULL);

	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sigemptyset(&sa.sa_mask);
	sa.sa_handler = on_term;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sa.sa_handler = on_chld;
	sa.sa_flags = SA_NOCLDSTOP;
	sigaction(SIGCHLD, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	signal(SIGHUP, SIG_IGN);

	if (write(STDOUT_FILENO, "ready\n", 6) < 0) { /* parent gone: keep going */ }
	int fd = open("/dev/null", O_RDWR);
	if (fd >= 0) {
		dup2(fd, 0);
		dup2(fd, 1);
		dup2(fd, 2);
		if (fd > 2) close(fd);
	}
	if (chdir("/") < 0) { /* ignore */ }

	for (;;) {
		while (waitpid(-1, NULL, WNOHANG) > 0) {}
		if (stop_sig) break;
		sigsuspend(&empty);
	}
	kill(-1, SIGKILL);
	for (;;) {
		if (waitpid(-1, NULL, 0) < 0 && errno != EINTR) break;
	}
	return 0;
}
