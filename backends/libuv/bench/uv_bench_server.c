/*
 * uv_bench_server.c — a plain libuv server for the benchmark of libuv on MegaPipe
 * (backends/libuv/bench/bench-libuv.sh): one loop, one thread, nothing MegaPipe-specific in it;
 * the same binary runs stock (no variable) or on a channel (UV_USE_MEGAPIPE=1).
 *
 *   uv_bench_server -m rpc|http [-s bytes] [-p port]
 *
 * rpc:  read exactly `bytes` bytes (default 64), echo them back (bench/'s rpc protocol).
 * http: read a request head (up to "\r\n\r\n"), answer a fixed 200 with keep-alive (the same
 *       response as bench/'s mpserver -m http).
 * Listens on 127.0.0.1 (port 0 = any free one), prints "port N" once listening; on SIGTERM or
 * SIGINT it stops and prints "result transactions=N connections=N".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <uv.h>

#define HTTP_MAX_HEAD 4096

static const char http_resp[] =
    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n"
    "Connection: keep-alive\r\n\r\nHello, world\n";

typedef struct conn {
    uv_tcp_t tcp;
    uv_write_t wreq;
    size_t have;
    int writing;
    char buf[]; /* bufsize bytes */
} conn;

static int http_mode;
static size_t msg_size = 64;
static size_t bufsize;
static unsigned long long transactions, connections;
static uv_tcp_t listener;
static uv_signal_t sigterm, sigint;

static void die(const char *what, int err) {
    fprintf(stderr, "uv_bench_server: %s: %s\n", what, uv_strerror(err));
    exit(1);
}

static void on_close(uv_handle_t *h) {
    free(h->data);
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b) {
    conn *c = h->data;
    (void)hint;
    *b = uv_buf_init(c->buf + c->have, (unsigned)(bufsize - c->have));
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b);

static void on_write(uv_write_t *w, int status) {
    conn *c = w->data;
    c->writing = 0;
    if (status < 0) {
        /* UV_ECANCELED: the stream is being closed already (libuv cancels its writes at the
         * close, e.g. at SIGTERM with a write still in flight); closing it again would run
         * on_close twice. */
        if (!uv_is_closing((uv_handle_t *)&c->tcp)) uv_close((uv_handle_t *)&c->tcp, on_close);
        return;
    }
    transactions++;
    c->have = 0;
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b) {
    conn *c = s->data;
    uv_buf_t out;
    (void)b;
    if (n < 0) {
        uv_close((uv_handle_t *)s, on_close);
        return;
    }
    c->have += (size_t)n;
    if (http_mode) {
        if (c->have < 4 || !memmem(c->buf, c->have, "\r\n\r\n", 4)) {
            if (c->have == bufsize) uv_close((uv_handle_t *)s, on_close);
            return;
        }
        out = uv_buf_init((char *)http_resp, sizeof http_resp - 1);
    } else {
        if (c->have < msg_size) return;
        out = uv_buf_init(c->buf, (unsigned)msg_size);
    }
    /* One request at a time per connection: stop reading until the answer is written. */
    uv_read_stop(s);
    c->writing = 1;
    c->wreq.data = c;
    int r = uv_write(&c->wreq, s, &out, 1, on_write);
    if (r < 0) uv_close((uv_handle_t *)s, on_close);
}

static void on_connection(uv_stream_t *l, int status) {
    if (status < 0) return;
    conn *c = malloc(sizeof *c + bufsize);
    if (!c) die("malloc", UV_ENOMEM);
    memset(c, 0, sizeof *c);
    uv_tcp_init(l->loop, &c->tcp);
    c->tcp.data = c;
    if (uv_accept(l, (uv_stream_t *)&c->tcp) != 0) {
        uv_close((uv_handle_t *)&c->tcp, on_close);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    connections++;
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

static void close_all(uv_handle_t *h, void *arg) {
    (void)arg;
    if (!uv_is_closing(h)) uv_close(h, h->type == UV_TCP && h != (uv_handle_t *)&listener ? on_close : NULL);
}

static void on_signal(uv_signal_t *s, int signum) {
    (void)signum;
    uv_walk(s->loop, close_all, NULL);
}

int main(int argc, char **argv) {
    struct sockaddr_in addr;
    int namelen = sizeof addr;
    int port = 0, opt, r;
    uv_loop_t *loop = uv_default_loop();

    while ((opt = getopt(argc, argv, "m:s:p:")) != -1) {
        if (opt == 'm') http_mode = !strcmp(optarg, "http");
        else if (opt == 's') msg_size = (size_t)atol(optarg);
        else if (opt == 'p') port = atoi(optarg);
        else {
            fprintf(stderr, "usage: %s -m rpc|http [-s bytes] [-p port]\n", argv[0]);
            return 2;
        }
    }
    if (msg_size < 1 || msg_size > (1 << 20)) die("-s", UV_EINVAL);
    bufsize = http_mode ? HTTP_MAX_HEAD : msg_size;
    signal(SIGPIPE, SIG_IGN);

    uv_tcp_init(loop, &listener);
    uv_ip4_addr("127.0.0.1", port, &addr);
    if ((r = uv_tcp_bind(&listener, (struct sockaddr *)&addr, 0)) != 0) die("bind", r);
    if ((r = uv_listen((uv_stream_t *)&listener, 4096, on_connection)) != 0) die("listen", r);
    uv_tcp_getsockname(&listener, (struct sockaddr *)&addr, &namelen);
    uv_signal_init(loop, &sigterm);
    uv_signal_start(&sigterm, on_signal, SIGTERM);
    uv_signal_init(loop, &sigint);
    uv_signal_start(&sigint, on_signal, SIGINT);
    printf("port %d\n", ntohs(addr.sin_port));
    fflush(stdout);

    uv_run(loop, UV_RUN_DEFAULT);
    printf("result transactions=%llu connections=%llu\n", transactions, connections);
    fflush(stdout);
    uv_loop_close(loop);
    return 0;
}
