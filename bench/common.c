/*
 * common.c — CPU lists, clocks and /proc CPU accounting for the bench tools.
 */
#include "common.h"

#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

int parse_cpu_list(const char *s, int *cpus, int max) {
    int n = 0;
    const char *p = s;
    while (*p) {
        char *end;
        long a = strtol(p, &end, 10), b;
        if (end == p || a < 0 || a >= CPU_SETSIZE) return -1;
        b = a;
        p = end;
        if (*p == '-') {
            p++;
            b = strtol(p, &end, 10);
            if (end == p || b < a || b >= CPU_SETSIZE) return -1;
            p = end;
        }
        for (long c = a; c <= b; c++) {
            if (n >= max) return -1;
            cpus[n++] = (int)c;
        }
        if (*p == ',') p++;
        else if (*p) return -1;
    }
    return n;
}

int online_cpus(int *cpus, int max) {
    cpu_set_t set;
    int n = 0;
    if (sched_getaffinity(0, sizeof set, &set) != 0) {
        cpus[0] = 0;
        return 1;
    }
    for (int c = 0; c < CPU_SETSIZE && n < max; c++)
        if (CPU_ISSET(c, &set)) cpus[n++] = c;
    return n;
}

int pin_self(int cpu) {
    if (cpu < 0) return 0;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return -pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int64_t proc_cpu_ns(pid_t pid) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
    DIR *d = opendir(path);
    if (!d) return -1;
    int64_t sum = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.') continue;
        char f[128];
        snprintf(f, sizeof f, "/proc/%d/task/%.20s/schedstat", (int)pid, de->d_name);
        FILE *fp = fopen(f, "r");
        if (!fp) continue; /* thread exited meanwhile */
        long long v;
        if (fscanf(fp, "%lld", &v) == 1) sum += v;
        fclose(fp);
    }
    closedir(d);
    return sum;
}

void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

int64_t cpus_busy_ns(const int *cpus, int n, int64_t *softirq) {
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return -1;
    long hz = sysconf(_SC_CLK_TCK);
    char line[512];
    int64_t busy = 0, si = 0;
    while (fgets(line, sizeof line, f)) {
        int cpu;
        unsigned long long v[8] = {0};
        if (sscanf(line, "cpu%d %llu %llu %llu %llu %llu %llu %llu %llu", &cpu, &v[0], &v[1],
                   &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]) < 8)
            continue;
        for (int i = 0; i < n; i++) {
            if (cpus[i] != cpu) continue;
            /* user nice system idle iowait irq softirq steal */
            busy += (int64_t)(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]);
            si += (int64_t)v[6];
        }
    }
    fclose(f);
    if (softirq) *softirq = si * (1000000000 / hz);
    return busy * (1000000000 / hz);
}
