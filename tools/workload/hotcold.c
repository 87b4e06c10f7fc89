/*
 * hotcold: a workload with a known hot range and known cold memory, for proving and measuring tierd.
 *
 *   hotcold --cold-mib N --hot-mib M [--hot-node K] [--seconds S] [--shift-after S]
 *           [--grow-mib G [--grow-after S]] [--ready FILE]
 *
 * Maps N MiB of private anonymous memory ("cold") and fills it first (so it takes the fast node first), then M MiB
 * ("hot"), allocated on node K when --hot-node is given (mbind MPOL_BIND while it is first touched, then the
 * range's policy is reset to default: the pages stay on node K but nothing pins them there). Then it writes one
 * word of every page of the hot range, over and over, for S seconds (default: until SIGTERM). With --shift-after,
 * after that many seconds the hot range becomes the last M MiB of the cold memory instead (filled last, so on the slow
 * node when the cold memory did not fit on the fast one); SIGUSR1 shifts it at once. With --grow-after, after that
 * many seconds (or on SIGUSR2, given --grow-mib) the working set grows instead: the last G MiB of the cold memory
 * are written too, beside the hot range (the ready file gets "grow addr bytes").
 *
 * Every page holds a pattern derived from its index; the hot writes only touch a counter word. At the end (or on
 * SIGTERM) every byte of every page is checked against the pattern and the result printed: "verify ok PAGES" or
 * "verify CORRUPT BAD-PAGES of PAGES". --ready FILE gets "pid cold_addr cold_bytes hot_addr hot_bytes" once the
 * memory is in place, and "shift new_hot_addr" when the hot range moves.
 *
 * Exit: 0 verified, 1 corrupt, 2 usage or setup error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define WORDS (PAGE / sizeof(uint64_t))
#define MPOL_DEFAULT 0
#define MPOL_BIND 2

static volatile sig_atomic_t stop, shift_now, grow_now;
static void on_term(int sig) { (void)sig; stop = 1; }
static void on_usr1(int sig) { (void)sig; shift_now = 1; }
static void on_usr2(int sig) { (void)sig; grow_now = 1; }

static uint64_t pattern(uint64_t page, uint64_t word) {
    uint64_t x = page * 0x9E3779B97F4A7C15ULL + word * 0xBF58476D1CE4E5B9ULL + 0x94D049BB133111EBULL;
    x ^= x >> 31;
    return x;
}

/* word 1 of each page is the counter the hot loop writes; every other word holds the pattern */
static void fill(uint64_t *base, size_t pages, uint64_t first_index) {
    for (size_t p = 0; p < pages; p++) {
        uint64_t *w = base + p * WORDS;
        for (size_t i = 0; i < WORDS; i++)
            w[i] = i == 1 ? 0 : pattern(first_index + p, i);
    }
}

static size_t verify(const uint64_t *base, size_t pages, uint64_t first_index) {
    size_t bad = 0;
    for (size_t p = 0; p < pages; p++) {
        const uint64_t *w = base + p * WORDS;
        for (size_t i = 0; i < WORDS; i++) {
            if (i != 1 && w[i] != pattern(first_index + p, i)) {
                bad++;
                break;
            }
        }
    }
    return bad;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *map(size_t bytes) {
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("hotcold: mmap");
        exit(2);
    }
    madvise(p, bytes, MADV_NOHUGEPAGE); /* 4 KiB pages: the unit tierd's samplers see */
    return p;
}

static long mbind_(void *addr, size_t len, int mode, const unsigned long *mask, unsigned long maxnode) {
    return syscall(SYS_mbind, addr, len, mode, mask, maxnode, 0);
}

int main(int argc, char **argv) {
    long cold_mib = -1, hot_mib = -1, hot_node = -1;
    long grow_mib = 0;
    double seconds = -1, shift_after = -1, grow_after = -1;
    const char *ready = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) { fprintf(stderr, "hotcold: %s needs a value\n", a); return 2; }
        if (!strcmp(a, "--cold-mib")) cold_mib = atol(v);
        else if (!strcmp(a, "--hot-mib")) hot_mib = atol(v);
        else if (!strcmp(a, "--hot-node")) hot_node = atol(v);
        else if (!strcmp(a, "--seconds")) seconds = atof(v);
        else if (!strcmp(a, "--shift-after")) shift_after = atof(v);
        else if (!strcmp(a, "--grow-after")) grow_after = atof(v);
        else if (!strcmp(a, "--grow-mib")) grow_mib = atol(v);
        else if (!strcmp(a, "--ready")) ready = v;
        else { fprintf(stderr, "hotcold: unknown option %s\n", a); return 2; }
        i++;
    }
    if (cold_mib < 0 || hot_mib <= 0 || (hot_node >= 0 && hot_node >= 64) || grow_mib < 0 || grow_mib > cold_mib
        || (grow_after >= 0 && grow_mib == 0)) {
        fprintf(stderr, "usage: hotcold --cold-mib N --hot-mib M [--hot-node K] [--seconds S] [--shift-after S] "
                        "[--grow-mib G (<= N) [--grow-after S]] [--ready FILE]\n");
        return 2;
    }
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);
    signal(SIGUSR1, on_usr1);
    signal(SIGUSR2, on_usr2);
    size_t cold_bytes = (size_t)cold_mib << 20, hot_bytes = (size_t)hot_mib << 20;
    size_t cold_pages = cold_bytes / PAGE, hot_pages = hot_bytes / PAGE;
    uint64_t *cold = cold_bytes ? map(cold_bytes) : NULL;
    if (cold) fill(cold, cold_pages, 0);
    uint64_t *hot = map(hot_bytes);
    if (hot_node >= 0) {
        unsigned long mask = 1UL << hot_node;
        if (mbind_(hot, hot_bytes, MPOL_BIND, &mask, 64) != 0) { perror("hotcold: mbind bind"); return 2; }
    }
    fill(hot, hot_pages, cold_pages);
    if (hot_node >= 0 && mbind_(hot, hot_bytes, MPOL_DEFAULT, NULL, 0) != 0) {
        perror("hotcold: mbind default");
        return 2;
    }
    if (ready) {
        FILE *f = fopen(ready, "w");
        if (!f) { perror("hotcold: ready file"); return 2; }
        fprintf(f, "%d %p %zu %p %zu\n", getpid(), (void *)cold, cold_bytes, (void *)hot, hot_bytes);
        fclose(f);
    }
    double start = now_s();
    uint64_t *target = hot, *grown = NULL;
    size_t target_pages = hot_pages, grown_pages = 0;
    uint64_t passes = 0;
    while (!stop) {
        for (size_t p = 0; p < target_pages && !stop; p++)
            target[p * WORDS + 1] += 1;
        for (size_t p = 0; p < grown_pages && !stop; p++)
            grown[p * WORDS + 1] += 1;
        passes++;
        double t = now_s() - start;
        if (seconds >= 0 && t >= seconds) break;
        if (grow_mib > 0 && (grow_now || (grow_after >= 0 && t >= grow_after)) && !grown) {
            grown_pages = ((size_t)grow_mib << 20) / PAGE;
            grown = cold + (cold_pages - grown_pages) * WORDS;
            if (ready) {
                FILE *f = fopen(ready, "a");
                if (f) { fprintf(f, "grow %p %zu\n", (void *)grown, grown_pages * PAGE); fclose(f); }
            }
        }
        if ((shift_now || (shift_after >= 0 && t >= shift_after)) && target == hot && cold_pages >= hot_pages) {
            target = cold + (cold_pages - hot_pages) * WORDS;
            target_pages = hot_pages;
            if (ready) {
                FILE *f = fopen(ready, "a");
                if (f) { fprintf(f, "shift %p\n", (void *)target); fclose(f); }
            }
        }
    }
    size_t bad = (cold ? verify(cold, cold_pages, 0) : 0) + verify(hot, hot_pages, cold_pages);
    size_t total = cold_pages + hot_pages;
    if (bad) {
        printf("verify CORRUPT %zu of %zu pages (%llu passes)\n", bad, total, (unsigned long long)passes);
        return 1;
    }
    printf("verify ok %zu pages (%llu passes)\n", total, (unsigned long long)passes);
    return 0;
}
