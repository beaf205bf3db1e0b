/* iouring — holds an io_uring instance (raw io_uring_setup, 8 entries, rings mmapped) and ticks.
 * Tern must refuse to migrate it. Usage: iouring --status FILE [--no-mmap]
 * Status keys: tick errors phase ring_fd sq_entries cq_entries mmapped
 * Verification: each tick fstat(ring_fd) still works and the mmapped SQ ring's ring_entries == 8. */
#include "wl.h"
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>

#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425
#endif
#define IORING_OFF_SQ_RING 0ULL

/* Mirrors struct io_uring_params from linux/io_uring.h (self-contained: headers are 6.1). */
struct sqring_offsets {
	uint32_t head, tail, ring_mask, ring_entries, flags, dropped, array, resv1;
	uint64_t user_addr;
};
struct cqring_offsets {
	uint32_t head, tail, ring_mask, ring_entries, overflow, cqes, flags, resv1;
	uint64_t user_addr;
};
struct uring_params {
	uint32_t sq_entries, cq_entries, flags, sq_thread_cpu, sq_thread_idle, features, wq_fd, resv[3];
	struct sqring_offsets sq_off;
	struct cqring_offsets cq_off;
};

int main(int argc, char **argv)
{
	int do_mmap = 1;
	wl_init(argc, argv);
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--status")) i++;
		else if (!strcmp(argv[i], "--no-mmap")) do_mmap = 0;
		else {
			fprintf(stderr, "iouring: unknown argument %s\n", argv[i]);
			return 2;
		}
	}
	struct uring_params p;
	memset(&p, 0, sizeof p);
	int fd = (int)syscall(__NR_io_uring_setup, 8, &p);
	if (fd < 0) {
		perror("iouring: io_uring_setup");
		return 2;
	}
	volatile uint32_t *sq_entries_ptr = NULL;
	if (do_mmap) {
		size_t len = p.sq_off.array + p.sq_entries * sizeof(uint32_t);
		char *sq = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
		if (sq == MAP_FAILED) {
			perror("iouring: mmap sq ring");
			return 2;
		}
		sq_entries_ptr = (volatile uint32_t *)(sq + p.sq_off.ring_entries);
	}
	char extra[256];
	snprintf(extra, sizeof extra, "ring_fd=%d sq_entries=%u cq_entries=%u mmapped=%d", fd, p.sq_entries,
		 p.cq_entries, do_mmap);
	wl_write_status("running", 0, extra);
	wl_ready(extra);
	for (uint64_t tick = 1;; tick++) {
		struct stat st;
		if (fstat(fd, &st)) wl_error("fstat-ring-fd errno=%d", errno);
		if (sq_entries_ptr && *sq_entries_ptr != p.sq_entries)
			wl_error("sq-ring-entries got=%u want=%u", *sq_entries_ptr, p.sq_entries);
		if (wl_term) wl_exit(tick, extra);
		wl_write_status("running", tick, extra);
		wl_sleep_ms(50);
	}
}
