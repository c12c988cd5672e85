/*
 * echo.c — the smallest MegaPipe server: one channel, a shared (not partitioned) listening
 * socket, regular fds, and half-close handled politely: when the client shuts down its
 * sending side, the server finishes its writes and shuts down its own (mp_disconnect).
 *
 *   echo [-p port] [-d seconds] [-h|--help]   (listens on 127.0.0.1; port 0 = any, printed)
 *
 * Accepts without MP_LWSOCKET, so every connection is a regular fd: mp_unregister() leaves it
 * open, and the server closes it.
 */
#define _GNU_SOURCE 1
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "megapipe.h"

typedef struct client {
    mp_handle *h;
    int fd;
    char buf[4096];
} client;

static void usage(FILE *f) {
    fprintf(f,
            "usage: echo [-p port] [-d seconds]\n"
            "  The smallest MegaPipe server: one channel, regular fds, echoes what it reads and\n"
            "  answers a half-close by finishing its writes and shutting down its own side.\n"
            "  -p  port on 127.0.0.1 (default 0 = any free one; printed as \"port N\")\n"
            "  -d  stop after this many seconds (default 10)\n"
            "  -h, --help  this text\n");
}

int main(int argc, char **argv) {
    static const struct option longopts[] = {{"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
    int port = 0, seconds = 10, opt;
    while ((opt = getopt_long(argc, argv, "p:d:h", longopts, NULL)) != -1) {
        switch (opt) {
        case 'p': port = atoi(optarg); break;
        case 'd': seconds = atoi(optarg); break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t sl = sizeof sa;
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(lfd, 128) < 0) {
        perror("bind/listen");
        return 1;
    }
    getsockname(lfd, (struct sockaddr *)&sa, &sl);
    printf("port %d\n", ntohs(sa.sin_port));
    fflush(stdout);

    mp_channel *ch = mp_create(NULL);
    if (!ch) {
        perror("mp_create");
        return 1;
    }
    mp_handle *lh = mp_register(ch, lfd, NULL, NULL);
    mp_accept(lh, 0, 0);
    time_t end = time(NULL) + seconds;
    mp_event ev;
    while (time(NULL) < end) {
        if (mp_dispatch(ch, &ev, 100) <= 0) continue;
        client *c = ev.cookie;
        switch (ev.cmd) {
        case MP_EV_ACCEPT:
            if (ev.result < 0) break;
            c = calloc(1, sizeof *c);
            if (!c || !(c->h = mp_register(ch, (int)ev.result, c, NULL))) {
                close((int)ev.result);
                free(c);
                break;
            }
            c->fd = (int)ev.result;
            mp_read(c->h, c->buf, sizeof c->buf);
            break;
        case MP_EV_READ: /* result > 0: EOF and errors come as DISCONNECT */
            mp_write(c->h, c->buf, (size_t)ev.result);
            break;
        case MP_EV_CLOSED: /* the kernel let go of c's buffer: free it, close the fd */
            if (c) {
                close(c->fd); /* a regular fd: mp_unregister() leaves it to us */
                free(c);
            }
            break;
        case MP_EV_WRITE: /* the buffer is free again: read the next message into it */
            if (ev.result > 0) mp_read(c->h, c->buf, sizeof c->buf);
            else mp_disconnect(c->h);
            break;
        case MP_EV_DISCONNECT:
            if (ev.flags & MP_EVF_LOCAL || ev.result < 0) {
                mp_unregister(c->h); /* its MP_EV_CLOSED follows */
            } else {
                mp_disconnect(c->h); /* peer half-closed: finish writes, then FIN */
            }
            break;
        default:
            break;
        }
    }
    mp_destroy(ch);
    close(lfd);
    return 0;
}
