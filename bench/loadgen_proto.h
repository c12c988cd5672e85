/*
 * loadgen_proto.h — the load generator's protocols: how a request is built and how the end of
 * its response is found.  rpc (fixed S-byte messages, the paper's microbenchmark), memcached
 * (text get/set), http (HTTP/1.1 GET over a file list, keep-alive).
 */
#ifndef LOADGEN_PROTO_H
#define LOADGEN_PROTO_H

#include <stddef.h>
#include <stdint.h>

typedef enum lg_mode { LG_RPC = 0, LG_MEMCACHED, LG_HTTP } lg_mode;

#define LGP_HDR_MAX 4096   /* response head (memcached first line, HTTP header) */
#define LGP_REQ_MAX 2048   /* memcached set with a value up to ~1.9 KiB; HTTP request line */

typedef struct lg_proto {
    lg_mode mode;
    size_t size;          /* rpc: message size */
    unsigned keys;        /* memcached: key space */
    size_t value_size;    /* memcached: set value size (<= LGP_REQ_MAX - 100) */
    unsigned get_pct;     /* memcached: % of requests that are gets */
    /* http: paths with cumulative weights */
    char **paths;
    double *cum;
    unsigned npaths;
    double zipf_mean;     /* http/any: requests per connection drawn Zipf-like with this mean
                             (0: fixed -n) */
    double zipf_s;        /* exponent fitted to zipf_mean */
    char *value;          /* value bytes */
} lg_proto;

typedef struct lgp_conn {
    char req[LGP_REQ_MAX];
    size_t req_len;
    char hdr[LGP_HDR_MAX];
    size_t hlen;
    size_t got;           /* rpc */
    int64_t body_left;    /* -1: still in the head */
    int bad;              /* this response was an error */
} lgp_conn;

/* Set up mode-specific data (file list, value, Zipf exponent).  Returns 0 or -1 (printed). */
int lgp_init(lg_proto *p, const char *filelist);

/* Transactions for a new connection: fixed n, or a Zipf-like draw when zipf_mean > 0. */
unsigned lgp_txns_for_conn(const lg_proto *p, unsigned n, uint64_t *rng);

/* Build the next request; req and len point at it (a shared buffer for rpc). */
void lgp_build(const lg_proto *p, lgp_conn *c, const char *rpc_buf, uint64_t *rng,
               const char **req, size_t *len);

/* Where to receive next: into the head buffer, or into scratch (discarded body bytes). */
void lgp_recv_target(const lg_proto *p, lgp_conn *c, char *scratch, size_t scratch_len,
                     char **buf, size_t *len);

/* n bytes arrived at the last target.  1 = response complete (c->bad: it was an error
 * response), 0 = need more, -1 = unparseable: close the connection. */
int lgp_input(const lg_proto *p, lgp_conn *c, size_t n);

static inline uint64_t lgp_rand(uint64_t *s) { /* xorshift64* */
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 2685821657736338717ull;
}

#endif
