/*
 * common.h — small helpers shared by mpserver and loadgen: CPU lists, clocks, CPU accounting.
 */
#ifndef MPBENCH_COMMON_H
#define MPBENCH_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include <sched.h>
#include <stdint.h>
#include <sys/types.h>

/* Parse "0", "0-3", "0,2,4-7" into cpus[] (at most max); returns the count, or -1 when the
 * list is malformed or names a CPU outside [0, CPU_SETSIZE). */
int parse_cpu_list(const char *s, int *cpus, int max);

/* The CPUs this process may run on (sched_getaffinity), in order; returns the count. */
int online_cpus(int *cpus, int max);

/* Pin the calling thread to one CPU (cpu < 0: leave it alone).  Returns 0 or -errno. */
int pin_self(int cpu);

uint64_t now_ns(void); /* CLOCK_MONOTONIC */
static inline uint64_t ns_since(uint64_t t0) { return now_ns() - t0; }

/* CPU time (ns) of every thread of process pid, from /proc/pid/task/<tid>/schedstat (first
 * field: time on CPU).  /proc/pid/schedstat alone is the main thread only.  Returns -1 when
 * the process is gone. */
int64_t proc_cpu_ns(pid_t pid);

/* Busy time of a set of CPUs from /proc/stat, in ns (USER_HZ ticks): everything but idle and
 * iowait, so it includes softirq work that ran outside any task (e.g. RPS on an idle CPU) and
 * any other process on those CPUs.  *softirq gets the softirq part.  Returns -1 on error. */
int64_t cpus_busy_ns(const int *cpus, int n, int64_t *softirq);

/* Raise RLIMIT_NOFILE's soft limit to the hard limit (connections need fds). */
void raise_nofile(void);

#endif
