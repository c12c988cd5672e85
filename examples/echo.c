/*
 * echo.c — the smallest MegaPipe server: one channel, a shared (not partitioned) listening
 * socket, regular fds, and half-close handled politely: when the client shuts down its
 * sending side, the server finishes its writes and shuts down its own (mp_disconnect).
 *
 *   echo [-p port] [-d seconds]      (listens on 127.0.0.1; port 0 = any, printed)
 */
#define _GNU_SOURCE 1
#include <arpa/inet.h>
#include <errno.h>
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

int main(int argc, char **argv) {
    int port = 0, seconds = 10, opt;
    while ((opt = getopt(argc, argv, "p:d:")) != -1) {
        if (opt == 'p') port = atoi(optarg);
        else if (opt == 'd') seconds = atoi(optarg);
        else return 2;
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
            c->fd = (int)ev.result;
            c->h = mp_register(ch, c->fd, c, NULL);
            mp_read(c->h, c->buf, sizeof c->buf);
            break;
        case MP_EV_READ:
            mp_write(c->h, c->buf, (size_t)ev.result);
            break;
        case MP_EV_WRITE: /* the buffer is free again: read the next message into it */
            if (ev.result > 0) mp_read(c->h, c->buf, sizeof c->buf);
            else mp_disconnect(c->h);
            break;
        case MP_EV_DISCONNECT:
            if (ev.flags & MP_EVF_LOCAL || ev.result < 0) {
                mp_unregister(c->h);
                close(c->fd);
                free(c);
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
