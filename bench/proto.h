/*
 * proto.h — the server side of the request protocols, independent of the engine.
 *
 * A connection owns one buffer of proto_bufsize() bytes.  The engine reads at most
 * proto_want() bytes at buf + have, adds what arrived to have, and calls proto_input(): 1 = a
 * whole request is in, send *resp (resp_len bytes), then proto_reset(); 0 = read more;
 * -1 = bad request, close the connection.  Memory per connection is therefore bounded by
 * proto_bufsize(), whatever a client sends or withholds.
 */
#ifndef MPBENCH_PROTO_H
#define MPBENCH_PROTO_H

#include <stddef.h>

typedef enum proto_kind { PROTO_RPC = 0, PROTO_HTTP = 1 } proto_kind;

typedef struct proto_config {
    proto_kind kind;
    size_t size;        /* rpc: message size (request = response) */
} proto_config;

typedef struct proto_conn {
    char *buf;
    size_t have;
} proto_conn;

size_t proto_bufsize(const proto_config *pc);
size_t proto_want(const proto_config *pc, const proto_conn *c);
int proto_input(const proto_config *pc, proto_conn *c, const void **resp, size_t *resp_len);
void proto_reset(const proto_config *pc, proto_conn *c);
int proto_parse(const char *name, proto_kind *kind); /* "rpc" | "http"; 0 or -1 */

#endif
