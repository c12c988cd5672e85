/*
 * loadgen_proto.c — request building and response framing for rpc, memcached and http.
 */
#define _GNU_SOURCE 1
#include "loadgen_proto.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ZIPF_MAX 1000 /* longest connection drawn, in requests */

static double zipf_mean_of(double s) {
    double num = 0, den = 0;
    for (int k = 1; k <= ZIPF_MAX; k++) {
        double w = pow(k, -s);
        num += k * w;
        den += w;
    }
    return num / den;
}

int lgp_init(lg_proto *p, const char *filelist) {
    if (p->zipf_mean > 0) {
        if (p->zipf_mean < 1 || p->zipf_mean > ZIPF_MAX / 2) {
            fprintf(stderr, "loadgen: Zipf mean must be in [1, %d]\n", ZIPF_MAX / 2);
            return -1;
        }
        double lo = 0.01, hi = 20; /* mean decreases as s grows */
        for (int i = 0; i < 100; i++) {
            double mid = (lo + hi) / 2;
            if (zipf_mean_of(mid) > p->zipf_mean) lo = mid;
            else hi = mid;
        }
        p->zipf_s = (lo + hi) / 2;
    }
    if (p->mode == LG_MEMCACHED) {
        if (p->value_size < 1 || p->value_size > LGP_REQ_MAX - 100 || p->keys < 1 || p->get_pct > 100) {
            fprintf(stderr, "loadgen: memcached value size must be 1..%d, keys >= 1\n", LGP_REQ_MAX - 100);
            return -1;
        }
        p->value = malloc(p->value_size);
        if (!p->value) return -1;
        memset(p->value, 'v', p->value_size);
    }
    if (p->mode == LG_HTTP) {
        if (!filelist) { /* one path, for mpserver -m http */
            p->paths = malloc(sizeof *p->paths);
            p->cum = malloc(sizeof *p->cum);
            p->paths[0] = strdup("/");
            p->cum[0] = 1;
            p->npaths = 1;
            return 0;
        }
        FILE *f = fopen(filelist, "r");
        if (!f) {
            perror(filelist);
            return -1;
        }
        char line[1024];
        unsigned cap = 0;
        double total = 0;
        while (fgets(line, sizeof line, f)) {
            char path[900];
            double w = 1;
            if (line[0] == '#' || sscanf(line, "%899s %lf", path, &w) < 1) continue;
            if (strlen(path) > 900 || w <= 0) continue;
            if (p->npaths == cap) {
                cap = cap ? cap * 2 : 256;
                p->paths = realloc(p->paths, cap * sizeof *p->paths);
                p->cum = realloc(p->cum, cap * sizeof *p->cum);
                if (!p->paths || !p->cum) return -1;
            }
            total += w;
            p->paths[p->npaths] = strdup(path);
            p->cum[p->npaths++] = total;
        }
        fclose(f);
        if (!p->npaths) {
            fprintf(stderr, "loadgen: no paths in %s\n", filelist);
            return -1;
        }
    }
    return 0;
}

static double unit(uint64_t *rng) { return (double)(lgp_rand(rng) >> 11) / 9007199254740992.0; }

unsigned lgp_txns_for_conn(const lg_proto *p, unsigned n, uint64_t *rng) {
    if (p->zipf_mean <= 0) return n;
    /* inverse-CDF by walking: ZIPF_MAX is small, and this runs once per connection */
    static __thread double *cdf;
    static __thread double cdf_s;
    if (!cdf || cdf_s != p->zipf_s) {
        free(cdf);
        cdf = malloc(ZIPF_MAX * sizeof *cdf);
        if (!cdf) return 1;
        double acc = 0;
        for (int k = 1; k <= ZIPF_MAX; k++) cdf[k - 1] = (acc += pow(k, -p->zipf_s));
        for (int k = 0; k < ZIPF_MAX; k++) cdf[k] /= acc;
        cdf_s = p->zipf_s;
    }
    double u = unit(rng);
    unsigned lo = 0, hi = ZIPF_MAX - 1;
    while (lo < hi) {
        unsigned mid = (lo + hi) / 2;
        if (cdf[mid] < u) lo = mid + 1;
        else hi = mid;
    }
    return lo + 1;
}

void lgp_build(const lg_proto *p, lgp_conn *c, const char *rpc_buf, uint64_t *rng,
               const char **req, size_t *len) {
    c->hlen = 0;
    c->got = 0;
    c->body_left = -1;
    c->bad = 0;
    switch (p->mode) {
    case LG_RPC:
        *req = rpc_buf;
        *len = p->size;
        return;
    case LG_MEMCACHED: {
        unsigned long key = (unsigned long)(lgp_rand(rng) % p->keys);
        int n;
        if (lgp_rand(rng) % 100 < p->get_pct) {
            n = snprintf(c->req, sizeof c->req, "get k%063lu\r\n", key); /* 64-byte key */
        } else {
            n = snprintf(c->req, sizeof c->req, "set k%063lu 0 0 %zu\r\n", key, p->value_size);
            memcpy(c->req + n, p->value, p->value_size);
            n += (int)p->value_size;
            memcpy(c->req + n, "\r\n", 2);
            n += 2;
        }
        c->req_len = (size_t)n;
        break;
    }
    case LG_HTTP: {
        double u = unit(rng) * p->cum[p->npaths - 1];
        unsigned lo = 0, hi = p->npaths - 1;
        while (lo < hi) {
            unsigned mid = (lo + hi) / 2;
            if (p->cum[mid] < u) lo = mid + 1;
            else hi = mid;
        }
        int n = snprintf(c->req, sizeof c->req, "GET %s HTTP/1.1\r\nHost: bench\r\n\r\n",
                         p->paths[lo]);
        c->req_len = (size_t)n < sizeof c->req ? (size_t)n : sizeof c->req - 1;
        break;
    }
    }
    *req = c->req;
    *len = c->req_len;
}

void lgp_recv_target(const lg_proto *p, lgp_conn *c, char *scratch, size_t scratch_len,
                     char **buf, size_t *len) {
    if (p->mode == LG_RPC) {
        *buf = scratch;
        *len = p->size - c->got;
    } else if (c->body_left < 0) {
        *buf = c->hdr + c->hlen;
        *len = sizeof c->hdr - 1 - c->hlen;
    } else {
        *buf = scratch;
        *len = (size_t)c->body_left < scratch_len ? (size_t)c->body_left : scratch_len;
    }
}

/* The head is complete at end (bytes after it: extra); set body_left or finish. */
static int head_done(lgp_conn *c, int64_t body, size_t extra) {
    c->body_left = body - (int64_t)extra;
    if (c->body_left < 0) return -1; /* more than we asked for: no pipelining here */
    return c->body_left == 0 ? 1 : 0;
}

int lgp_input(const lg_proto *p, lgp_conn *c, size_t n) {
    if (p->mode == LG_RPC) {
        c->got += n;
        return c->got >= p->size ? 1 : 0;
    }
    if (c->body_left >= 0) {
        c->body_left -= (int64_t)n;
        return c->body_left <= 0 ? 1 : 0;
    }
    c->hlen += n;
    c->hdr[c->hlen] = 0;
    if (p->mode == LG_MEMCACHED) {
        char *eol = strstr(c->hdr, "\r\n");
        if (!eol) return c->hlen >= sizeof c->hdr - 1 ? -1 : 0;
        size_t line = (size_t)(eol - c->hdr) + 2, extra = c->hlen - line;
        size_t vlen;
        if (!strncmp(c->hdr, "VALUE ", 6)) {
            *eol = 0;
            char *sp = strrchr(c->hdr, ' '); /* "VALUE <key> <flags> <bytes>" */
            *eol = '\r';
            if (!sp || sscanf(sp + 1, "%zu", &vlen) != 1) return -1;
            return head_done(c, (int64_t)vlen + 2 + 5, extra); /* data\r\n END\r\n */
        }
        if (!strncmp(c->hdr, "END\r\n", 5) || !strncmp(c->hdr, "STORED\r\n", 8) ||
            !strncmp(c->hdr, "NOT_STORED\r\n", 12))
            return head_done(c, 0, extra);
        c->bad = 1; /* ERROR, CLIENT_ERROR, SERVER_ERROR ... */
        return head_done(c, 0, extra);
    }
    /* HTTP */
    char *end = strstr(c->hdr, "\r\n\r\n");
    if (!end) return c->hlen >= sizeof c->hdr - 1 ? -1 : 0;
    size_t head = (size_t)(end - c->hdr) + 4, extra = c->hlen - head;
    int status = 0;
    if (sscanf(c->hdr, "HTTP/1.%*d %d", &status) != 1) return -1;
    c->bad = status != 200;
    long long cl = 0;
    char *h = strcasestr(c->hdr, "\r\ncontent-length:");
    if (h && h < end) cl = atoll(h + 17);
    else if (strcasestr(c->hdr, "\r\ntransfer-encoding:")) return -1; /* chunked: not needed */
    return head_done(c, cl, extra);
}
