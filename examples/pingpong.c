/*
 * pingpong.c — the paper's Listing 1 (the ping-pong server), in C, one channel per core.
 *
 * Each worker thread is pinned to one CPU, owns one channel, and registers the shared
 * listening address with cpu_mask = {its CPU}: the kernel then hands it exactly the
 * connections whose SYN that CPU handled.  The loop below reads almost line for line like the
 * paper's pseudo-code.
 *
 *   pingpong [-p port] [-t threads] [-d seconds] [-h|--help]
 *
 * Listens on 127.0.0.1 (port 0 = any; the chosen port is printed as "port N"), echoes every
 * message (up to READSIZE bytes per read), and stops by itself after -d seconds (0 = run until
 * SIGINT/SIGTERM).
 *
 * Accepted connections are lwsockets when the engine can make them (io_uring) and regular fds
 * otherwise (MP_ENGINE=epoll, MP_LWSOCKET=0): mp_unregister() closes an lwsocket, a regular fd
 * stays ours to close.
 */
#define _GNU_SOURCE 1
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "megapipe.h"

#define READSIZE 65536

typedef struct conn {
    mp_handle *handle;
    int fd; /* lwsocket id or regular fd (mp_is_lwsocket() tells) */
    char buf[READSIZE];
} conn;

typedef struct worker {
    pthread_t tid;
    int cpu, listen_sd;
    mp_channel *ch;
    unsigned long transactions;
} worker;

static volatile sig_atomic_t stop;

static void *serve(void *arg) {
    worker *w = arg;
    cpu_set_t mask;
    CPU_ZERO(&mask);
    CPU_SET(w->cpu, &mask);
    pthread_setaffinity_np(pthread_self(), sizeof mask, &mask);

    mp_channel *ch = w->ch;
    conn listener = {0};
    listener.handle = mp_register(ch, w->listen_sd, &listener, &mask);
    if (!listener.handle) {
        fprintf(stderr, "mp_register(listener): %s\n", strerror(errno));
        return NULL;
    }
    mp_accept(listener.handle, 0, MP_LWSOCKET);

    mp_event ev;
    while (!stop) {
        int r = mp_dispatch(ch, &ev, -1);
        if (r < 0 && r != -EINTR) {
            fprintf(stderr, "mp_dispatch: %s\n", strerror(-r));
            break;
        }
        if (r <= 0 || ev.cmd == MP_EV_WAKE) continue;
        conn *c = ev.cookie;
        switch (ev.cmd) {
        case MP_EV_ACCEPT:
            if (ev.result < 0) break; /* e.g. EMFILE: the channel retries by itself */
            c = malloc(sizeof *c);
            if (!c || !(c->handle = mp_register(ch, (int)ev.result, c, NULL))) {
                mp_close_accepted(ch, (int)ev.result); /* an fd or an lwsocket */
                free(c);
                break;
            }
            c->fd = (int)ev.result;
            mp_read(c->handle, c->buf, READSIZE);
            break;
        case MP_EV_READ:
            mp_write(c->handle, c->buf, (size_t)ev.result); /* result > 0: bytes read */
            break;
        case MP_EV_WRITE:
            w->transactions++;
            mp_read(c->handle, c->buf, READSIZE);
            break;
        case MP_EV_DISCONNECT:
            mp_unregister(c->handle);           /* closes an lwsocket; CLOSED follows */
            break;
        case MP_EV_CLOSED:                      /* the kernel let go: c is ours again */
            if (c == &listener) break;
            if (!mp_is_lwsocket(c->fd)) close(c->fd); /* a regular fd is ours to close */
            free(c);
            break;
        default:
            break;
        }
    }
    return NULL;
}

static void on_signal(int sig) { (void)sig; stop = 1; }

static void usage(FILE *f) {
    fprintf(f,
            "usage: pingpong [-p port] [-t threads] [-d seconds]\n"
            "  The paper's ping-pong server: one channel per thread, each pinned to a CPU with its\n"
            "  own partition of the listening address; echoes every message.\n"
            "  -p  port on 127.0.0.1 (default 0 = any free one; printed as \"port N\")\n"
            "  -t  threads = channels (default: one per online CPU)\n"
            "  -d  stop after this many seconds (default 0 = run until SIGINT/SIGTERM)\n"
            "  -h, --help  this text\n"
            "  Environment: MP_ENGINE, MP_LWSOCKET, MP_BATCH, ... (see docs/api.md)\n");
}

int main(int argc, char **argv) {
    static const struct option longopts[] = {{"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
    int port = 0, threads = (int)sysconf(_SC_NPROCESSORS_ONLN), seconds = 0, opt;
    while ((opt = getopt_long(argc, argv, "p:t:d:h", longopts, NULL)) != -1) {
        switch (opt) {
        case 'p': port = atoi(optarg); break;
        case 't': threads = atoi(optarg); break;
        case 'd': seconds = atoi(optarg); break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (threads < 1) threads = 1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int listen_sd = mp_listen_socket((struct sockaddr *)&sa, sizeof sa, 4096);
    if (listen_sd < 0) {
        fprintf(stderr, "mp_listen_socket: %s\n", strerror(-listen_sd));
        return 1;
    }
    socklen_t sl = sizeof sa;
    getsockname(listen_sd, (struct sockaddr *)&sa, &sl);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);

    worker *ws = calloc((size_t)threads, sizeof *ws);
    for (int i = 0; i < threads; i++) {
        ws[i].cpu = i % (int)sysconf(_SC_NPROCESSORS_ONLN);
        ws[i].listen_sd = listen_sd;
        ws[i].ch = mp_create(NULL);
        if (!ws[i].ch) {
            fprintf(stderr, "mp_create: %s\n", strerror(errno));
            return 1;
        }
        pthread_create(&ws[i].tid, NULL, serve, &ws[i]);
    }
    printf("port %d engine %s threads %d\n", ntohs(sa.sin_port), mp_engine_name(ws[0].ch), threads);
    fflush(stdout);
    for (int s = 0; !stop && (seconds == 0 || s < seconds * 10); s++) usleep(100000);
    stop = 1;
    unsigned long total = 0;
    for (int i = 0; i < threads; i++) mp_wake(ws[i].ch);
    for (int i = 0; i < threads; i++) {
        pthread_join(ws[i].tid, NULL);
        total += ws[i].transactions;
        printf("channel %d (cpu %d): %lu transactions\n", i, ws[i].cpu, ws[i].transactions);
        mp_destroy(ws[i].ch);
    }
    printf("total %lu transactions\n", total);
    close(listen_sd);
    free(ws);
    return 0;
}
