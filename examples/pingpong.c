/*
 * pingpong.c — the paper's Listing 1 (the ping-pong server), in C, one channel per core.
 *
 * Each worker thread is pinned to one CPU, owns one channel, and registers the shared
 * listening address with cpu_mask = {its CPU}: the kernel then hands it exactly the
 * connections whose SYN that CPU handled.  The loop below reads almost line for line like the
 * paper's pseudo-code.
 *
 *   pingpong [-p port] [-t threads] [-d seconds] [-s size]
 *
 * Listens on 127.0.0.1 (port 0 = any; the chosen port is printed as "port N"), echoes every
 * message, and stops by itself after -d seconds (0 = run until SIGINT/SIGTERM).
 */
#define _GNU_SOURCE 1
#include <arpa/inet.h>
#include <errno.h>
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
            c->handle = mp_register(ch, (int)ev.result, c, NULL);
            mp_read(c->handle, c->buf, READSIZE);
            break;
        case MP_EV_READ:
            mp_write(c->handle, c->buf, (size_t)ev.result);
            break;
        case MP_EV_WRITE:
            w->transactions++;
            mp_read(c->handle, c->buf, READSIZE);
            break;
        case MP_EV_DISCONNECT:
            mp_unregister(c->handle);
            free(c);
            break;
        default:
            break;
        }
    }
    return NULL;
}

static void on_signal(int sig) { (void)sig; stop = 1; }

int main(int argc, char **argv) {
    int port = 0, threads = (int)sysconf(_SC_NPROCESSORS_ONLN), seconds = 0, opt;
    while ((opt = getopt(argc, argv, "p:t:d:h")) != -1) {
        switch (opt) {
        case 'p': port = atoi(optarg); break;
        case 't': threads = atoi(optarg); break;
        case 'd': seconds = atoi(optarg); break;
        default:
            fprintf(stderr, "usage: %s [-p port] [-t threads] [-d seconds]\n", argv[0]);
            return opt == 'h' ? 0 : 2;
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
