/*
 * server.h — what mpserver's parts share: the configuration, the per-thread worker record
 * (counters read by the main thread), and the two engines' entry points.
 */
#ifndef MPSERVER_H
#define MPSERVER_H

#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>

#include "common.h"
#include "megapipe.h"
#include "proto.h"

#define MAX_THREADS 1024

typedef struct srv_config {
    int megapipe;            /* 0 = baseline (epoll + BSD calls), 1 = the library */
    int P, B, L;             /* megapipe: partition, batch (32 vs 1), lwsockets */
    int mp_engine;           /* MP_ENGINE_AUTO / URING / EPOLL */
    int R;                   /* megapipe: buffered reads (multishot receive, provided buffers) */
    int threads;
    int cpus[MAX_THREADS];   /* thread i runs on cpus[i % ncpus] */
    int ncpus;
    int backlog;
    int listen_fd;
    proto_config proto;
} srv_config;

typedef struct srv_worker {
    pthread_t tid;
    int idx, cpu;
    const srv_config *cfg;
    _Atomic uint64_t txns;     /* completed transactions (responses fully written) */
    _Atomic uint64_t accepts;
    uint64_t app_syscalls;     /* syscalls the server code made itself (baseline: all) */
    uint64_t accept_errors;
    uint64_t conn_errors;      /* connections that ended with an error (reset, bad request) */
    uint64_t peak_conns;
    int failed;                /* the thread could not start (error printed) */
    mp_channel *ch;            /* megapipe */
    mp_stats st;               /* megapipe: the channel's counters at exit */
    int epfd;                  /* baseline */
} __attribute__((aligned(64))) srv_worker;

extern atomic_int g_stop;

/* Each engine: prepare (main thread, before threads start), the thread body, and a way to
 * make blocked threads look at g_stop. */
int baseline_prepare(srv_config *cfg, srv_worker *w);
void *baseline_thread(void *arg);
void baseline_wake(srv_worker *w);

int megapipe_prepare(srv_config *cfg, srv_worker *w);
void *megapipe_thread(void *arg);
void megapipe_wake(srv_worker *w);
void megapipe_finish(srv_worker *w);

#endif
