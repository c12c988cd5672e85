/*
 * proto_rpc.c — server protocols: rpc (the paper's microbenchmark: read exactly S bytes, echo
 * them back) and a tiny static HTTP/1.1 responder (reads a request head, answers a fixed
 * 200 with keep-alive; enough for a load generator's http mode).
 */
#include <string.h>

#include "proto.h"

#define HTTP_MAX_HEAD 4096

static const char http_resp[] =
    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n"
    "Connection: keep-alive\r\n\r\nHello, world\n";

int proto_parse(const char *name, proto_kind *kind) {
    if (!strcmp(name, "rpc")) *kind = PROTO_RPC;
    else if (!strcmp(name, "http")) *kind = PROTO_HTTP;
    else return -1;
    return 0;
}

size_t proto_bufsize(const proto_config *pc) {
    return pc->kind == PROTO_RPC ? pc->size : HTTP_MAX_HEAD;
}

size_t proto_want(const proto_config *pc, const proto_conn *c) {
    return proto_bufsize(pc) - c->have;
}

int proto_input(const proto_config *pc, proto_conn *c, const void **resp, size_t *resp_len) {
    if (pc->kind == PROTO_RPC) {
        if (c->have < pc->size) return 0;
        *resp = c->buf;
        *resp_len = pc->size;
        return 1;
    }
    /* HTTP: one request at a time (no pipelining); a head that does not fit is refused. */
    if (c->have >= 4 && memmem(c->buf, c->have, "\r\n\r\n", 4)) {
        *resp = http_resp;
        *resp_len = sizeof http_resp - 1;
        return 1;
    }
    return c->have >= HTTP_MAX_HEAD ? -1 : 0;
}

void proto_reset(const proto_config *pc, proto_conn *c) {
    (void)pc;
    c->have = 0;
}
