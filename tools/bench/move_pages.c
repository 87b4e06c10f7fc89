/*
 * Reference side of tools/bench_move_pages.py: the same move_pages(2) calls as tierd's PageMover, from C.
 *
 * Driven over stdin/stdout, one command per line, so the Python driver can interleave runs of both sides:
 *   alloc BYTES THP        mmap BYTES (2 MiB aligned), madvise HUGEPAGE if THP=1 (NOHUGEPAGE otherwise), write
 *                          every byte; replies "ok ADDRESS"
 *   run MODE PAGE_BYTES NPAGES BATCH TARGET
 *                          one pass over the first NPAGES pages (one address per PAGE_BYTES) in calls of BATCH
 *                          pages; MODE is "move" (nodes = TARGET for every page), "query" (nodes = NULL) or
 *                          "filtered" (query, drop pages already on TARGET or in error, move the rest);
 *                          replies "ok NS MOVED ERRORS CALLS" (MOVED: status == TARGET after the pass)
 *   checksum               replies "ok SUM" (sum of the buffer as 64-bit words)
 *   quit
 * Arrays are built before the timed section; the time covers the syscalls and, for "filtered", the compaction.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define HUGE (2UL << 20)

static char *buf;
static size_t buf_bytes;

static long move_pages(unsigned long count, void **pages, const int *nodes, int *status, int flags)
{
	return syscall(SYS_move_pages, 0, count, pages, nodes, status, flags);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static int do_alloc(size_t bytes, int thp)
{
	char *raw = mmap(NULL, bytes + HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (raw == MAP_FAILED)
		return -errno;
	buf = (char *)(((uintptr_t)raw + HUGE - 1) & ~(HUGE - 1));
	buf_bytes = bytes;
	if (madvise(buf, bytes, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE) != 0)
		return -errno;
	uint64_t *w = (uint64_t *)buf;
	for (size_t i = 0; i < bytes / 8; i++)
		w[i] = i * 2654435761ULL;
	return 0;
}

#define MOVE_FLAGS 2 /* MPOL_MF_MOVE */

int main(void)
{
	char line[256], mode[16];
	void **addrs = NULL, **todo = NULL;
	int *nodes = NULL, *status = NULL;
	size_t cap = 0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	while (fgets(line, sizeof line, stdin)) {
		unsigned long a1, a2, page, npages, batch;
		int target;
		if (sscanf(line, "alloc %lu %lu", &a1, &a2) == 2) {
			int rc = do_alloc(a1, (int)a2);
			if (rc)
				printf("err %d\n", -rc);
			else
				printf("ok %lu\n", (unsigned long)buf);
		} else if (sscanf(line, "run %15s %lu %lu %lu %d", mode, &page, &npages, &batch, &target) == 5) {
			if (!buf || npages * page > buf_bytes + page || batch == 0) {
				printf("err %d\n", EINVAL);
				continue;
			}
			if (npages > cap) {
				cap = npages;
				addrs = realloc(addrs, cap * sizeof *addrs);
				todo = realloc(todo, cap * sizeof *todo);
				nodes = realloc(nodes, cap * sizeof *nodes);
				status = realloc(status, cap * sizeof *status);
			}
			for (size_t i = 0; i < npages; i++) {
				addrs[i] = buf + i * page;
				nodes[i] = target;
				status[i] = INT32_MIN;
			}
			int query = !strcmp(mode, "query"), filtered = !strcmp(mode, "filtered");
			unsigned long calls = 0, n = npages;
			void **list = addrs;
			long rc = 0;
			uint64_t t0 = now_ns();
			if (query || filtered) {
				for (size_t s = 0; s < npages && rc >= 0; s += batch, calls++)
					rc = move_pages(npages - s < batch ? npages - s : batch, addrs + s, NULL, status + s, 0);
				if (filtered) {
					n = 0;
					for (size_t i = 0; i < npages; i++)
						if (status[i] >= 0 && status[i] != target)
							todo[n++] = addrs[i];
					list = todo;
				}
			}
			if (!query) {
				for (size_t s = 0; s < n && rc >= 0; s += batch, calls++)
					rc = move_pages(n - s < batch ? n - s : batch, list + s, nodes + s, status + s, MOVE_FLAGS);
			}
			uint64_t t1 = now_ns();
			if (rc < 0) {
				printf("err %d\n", errno);
				continue;
			}
			unsigned long moved = 0, errors = 0;
			for (size_t i = 0; i < (query ? npages : n); i++) {
				if (status[i] == target)
					moved++;
				else if (status[i] < 0)
					errors++;
			}
			printf("ok %llu %lu %lu %lu\n", (unsigned long long)(t1 - t0), moved, errors, calls);
		} else if (!strncmp(line, "checksum", 8)) {
			uint64_t sum = 0, *w = (uint64_t *)buf;
			for (size_t i = 0; buf && i < buf_bytes / 8; i++)
				sum += w[i];
			printf("ok %llu\n", (unsigned long long)sum);
		} else if (!strncmp(line, "quit", 4)) {
			break;
		} else {
			printf("err %d\n", EINVAL);
		}
	}
	return 0;
}
