/*
 * mc_stress.c — checksummed stress of a memcached server (issue 13, point 2).
 *
 *   mc_stress HOST PORT [-s SHORT] [-p PERSISTENT] [-o OPS] [-t THREADS] [-x MAXSIZE] [-r SEED]
 *
 * SHORT connections (default 10,000) each set one key, read it back and close; PERSISTENT
 * connections (default 256) each own KEYS keys and run OPS mixed operations: sets of a new
 * version, single gets, multi-key gets (several responses in one transmit) and pipelined
 * set+get pairs.  Value sizes are log-uniform over 1 B .. MAXSIZE (default 512 KiB).  Every
 * value is derived from (key, version): each one read back is compared byte for byte with
 * what the client last stored, and its FNV-1a checksum is added to a running total that must
 * equal the total of the expected values.  A miss, a wrong byte, a protocol error or a
 * dropped connection fails the run (exit 1).  Keys are owned by one connection, so the
 * expected value is always known.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#define KEYS 8

static struct sockaddr_in srv;
static int nshort = 10000, npersist = 256, nops = 200, nthreads = 16;
static size_t maxsize = 512 * 1024;
static uint64_t seed = 1;

static atomic_int next_short;
static atomic_ullong values_checked, bytes_checked, sum_got, sum_want, ops_done;
static atomic_int failures;

static uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t fnv(const unsigned char *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

/* The value of (key, version): its size and bytes follow from the pair alone. */
static size_t value_size(uint64_t key, uint32_t ver) {
    uint64_t s = seed ^ (key * 0x2545f4914f6cdd1dull) ^ ((uint64_t)ver << 40);
    double r = (double)(splitmix(&s) >> 11) / (double)(1ull << 53);
    size_t n = (size_t)exp(r * log((double)maxsize));
    return n < 1 ? 1 : n > maxsize ? maxsize : n;
}

static void value_fill(uint64_t key, uint32_t ver, unsigned char *p, size_t n) {
    uint64_t s = seed ^ (key << 20) ^ ver;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t v = splitmix(&s);
        memcpy(p + i, &v, 8);
    }
    uint64_t v = splitmix(&s);
    memcpy(p + i, &v, n - i);
}

static void fail(const char *what, uint64_t key) {
    fprintf(stderr, "mc_stress: FAIL: %s (key %llu)\n", what, (unsigned long long)key);
    atomic_fetch_add(&failures, 1);
}

/* A connection with a small input buffer. */
struct mconn {
    int fd;
    char in[65536];
    size_t beg, end;
};

static int mc_connect(struct mconn *c) {
    c->beg = c->end = 0;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->fd < 0) return -1;
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct timeval tv = {30, 0}; /* a hung server fails the run instead of hanging it */
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    for (int tries = 0; tries < 50; tries++) {
        if (connect(c->fd, (struct sockaddr *)&srv, sizeof srv) == 0) return 0;
        if (errno != EAGAIN && errno != ECONNREFUSED) break;
        usleep(20000);
    }
    close(c->fd);
    return -1;
}

static int send_all(struct mconn *c, const void *buf, size_t n) {
    const char *p = buf;
    while (n) {
        ssize_t r = send(c->fd, p, n, MSG_NOSIGNAL);
        if (r <= 0) {
            if (r < 0 && errno == EINTR) continue;
            return -1;
        }
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static int fill(struct mconn *c) {
    if (c->beg == c->end) c->beg = c->end = 0;
    if (c->end == sizeof c->in) {
        memmove(c->in, c->in + c->beg, c->end - c->beg);
        c->end -= c->beg;
        c->beg = 0;
    }
    ssize_t r;
    do r = recv(c->fd, c->in + c->end, sizeof c->in - c->end, 0);
    while (r < 0 && errno == EINTR);
    if (r <= 0) return -1;
    c->end += (size_t)r;
    return 0;
}

/* One "\r\n"-terminated line into line (without the terminator). */
static int read_line(struct mconn *c, char *line, size_t cap) {
    for (;;) {
        char *nl = memchr(c->in + c->beg, '\n', c->end - c->beg);
        if (nl) {
            size_t n = (size_t)(nl - (c->in + c->beg)) + 1;
            if (n < 2 || n - 2 >= cap || nl[-1] != '\r') return -1;
            memcpy(line, c->in + c->beg, n - 2);
            line[n - 2] = 0;
            c->beg += n;
            return 0;
        }
        if (c->end - c->beg >= cap) return -1;
        if (fill(c)) return -1;
    }
}

static int read_bytes(struct mconn *c, unsigned char *dst, size_t n) {
    while (n) {
        if (c->beg == c->end && fill(c)) return -1;
        size_t k = c->end - c->beg < n ? c->end - c->beg : n;
        memcpy(dst, c->in + c->beg, k);
        c->beg += k;
        dst += k;
        n -= k;
    }
    return 0;
}

static void key_name(char *buf, size_t cap, uint64_t key) {
    snprintf(buf, cap, "stress:%016llx:%llu", (unsigned long long)(key * 0x9e3779b97f4a7c15ull),
             (unsigned long long)key);
}

/* Append "set" of (key, ver) to the connection's output (sent at once, big values by pieces). */
static int send_set(struct mconn *c, uint64_t key, uint32_t ver, unsigned char *scratch) {
    char k[64], hdr[128];
    key_name(k, sizeof k, key);
    size_t n = value_size(key, ver);
    value_fill(key, ver, scratch, n);
    int h = snprintf(hdr, sizeof hdr, "set %s %u 0 %zu\r\n", k, ver, n);
    if (send_all(c, hdr, (size_t)h) || send_all(c, scratch, n) || send_all(c, "\r\n", 2)) return -1;
    return 0;
}

static int expect_line(struct mconn *c, const char *want, uint64_t key) {
    char line[512];
    if (read_line(c, line, sizeof line)) {
        fail("connection lost or bad line", key);
        return -1;
    }
    if (strcmp(line, want) != 0) {
        fprintf(stderr, "mc_stress: got \"%s\", want \"%s\"\n", line, want);
        fail("unexpected reply", key);
        return -1;
    }
    return 0;
}

/* Read one VALUE block for key (expected version ver) and check it. */
static int check_value(struct mconn *c, uint64_t key, uint32_t ver, unsigned char *got,
                       unsigned char *want) {
    char line[512], k[64], name[128];
    unsigned flags;
    size_t n;
    key_name(k, sizeof k, key);
    if (read_line(c, line, sizeof line)) {
        fail("connection lost before VALUE", key);
        return -1;
    }
    if (sscanf(line, "VALUE %127s %u %zu", name, &flags, &n) != 3 || strcmp(name, k) != 0) {
        fprintf(stderr, "mc_stress: got \"%s\" for %s\n", line, k);
        fail(strncmp(line, "END", 3) == 0 ? "miss" : "bad VALUE line", key);
        return -1;
    }
    size_t wn = value_size(key, ver);
    if (flags != ver || n != wn) {
        fail("wrong version or size", key);
        return -1;
    }
    if (read_bytes(c, got, n) || read_bytes(c, (unsigned char *)line, 2) || memcmp(line, "\r\n", 2)) {
        fail("short value", key);
        return -1;
    }
    value_fill(key, ver, want, n);
    atomic_fetch_add(&sum_got, fnv(got, n));
    atomic_fetch_add(&sum_want, fnv(want, n));
    atomic_fetch_add(&values_checked, 1);
    atomic_fetch_add(&bytes_checked, n);
    if (memcmp(got, want, n) != 0) {
        fail("value differs from what was stored", key);
        return -1;
    }
    return 0;
}

struct bufs {
    unsigned char *a, *b;
};

static int short_conn(int id, struct bufs *B) {
    struct mconn *c = malloc(sizeof *c);
    if (!c) return -1;
    uint64_t key = 1000000000ull + (uint64_t)id;
    int r = -1;
    if (mc_connect(c)) {
        fail("short connection: connect", key);
        free(c);
        return -1;
    }
    char k[64], get[96];
    key_name(k, sizeof k, key);
    int gl = snprintf(get, sizeof get, "get %s\r\n", k);
    if (send_set(c, key, 1, B->a) == 0 && expect_line(c, "STORED", key) == 0 &&
        send_all(c, get, (size_t)gl) == 0 && check_value(c, key, 1, B->a, B->b) == 0 &&
        expect_line(c, "END", key) == 0)
        r = 0;
    else if (!atomic_load(&failures))
        fail("short connection", key);
    atomic_fetch_add(&ops_done, 2);
    close(c->fd);
    free(c);
    return r;
}

/* A persistent connection: owns keys id*KEYS .. id*KEYS+KEYS-1 and knows their versions. */
struct pconn {
    struct mconn c;
    uint64_t base, rng;
    uint32_t ver[KEYS];
};

static int persistent_open(struct pconn *p, int id) {
    memset(p->ver, 0, sizeof p->ver);
    p->base = (uint64_t)id * KEYS;
    p->rng = seed * 7919 + (uint64_t)id;
    if (mc_connect(&p->c)) {
        fail("persistent connection: connect", p->base);
        return -1;
    }
    return 0;
}

/* One mixed operation on a persistent connection. */
static int persistent_op(struct pconn *p, struct bufs *B) {
    struct mconn *c = &p->c;
    uint64_t base = p->base;
    uint32_t *ver = p->ver;
    unsigned kind = (unsigned)(splitmix(&p->rng) % 10);
    unsigned i = (unsigned)(splitmix(&p->rng) % KEYS);
    int r;
    if (ver[i] == 0 || kind < 2) { /* set a new version */
        ver[i]++;
        r = send_set(c, base + i, ver[i], B->a) || expect_line(c, "STORED", base + i);
    } else if (kind < 6) { /* single get */
        char k[64], get[96];
        key_name(k, sizeof k, base + i);
        int gl = snprintf(get, sizeof get, "get %s\r\n", k);
        r = send_all(c, get, (size_t)gl) || check_value(c, base + i, ver[i], B->a, B->b) ||
            expect_line(c, "END", base + i);
    } else if (kind < 8) { /* multi-get of every key stored so far: one request, many values */
        char req[KEYS * 64 + 16];
        size_t o = (size_t)snprintf(req, sizeof req, "get");
        for (unsigned j = 0; j < KEYS; j++)
            if (ver[j]) {
                char k[64];
                key_name(k, sizeof k, base + j);
                o += (size_t)snprintf(req + o, sizeof req - o, " %s", k);
            }
        o += (size_t)snprintf(req + o, sizeof req - o, "\r\n");
        r = send_all(c, req, o);
        for (unsigned j = 0; j < KEYS && r == 0; j++)
            if (ver[j]) r = check_value(c, base + j, ver[j], B->a, B->b);
        if (r == 0) r = expect_line(c, "END", base);
    } else { /* pipelined: set a new version and get it, in one send, replies together */
        ver[i]++;
        char k[64], hdr[128], get[96];
        key_name(k, sizeof k, base + i);
        size_t n = value_size(base + i, ver[i]);
        value_fill(base + i, ver[i], B->a, n);
        int h = snprintf(hdr, sizeof hdr, "set %s %u 0 %zu\r\n", k, ver[i], n);
        int gl = snprintf(get, sizeof get, "\r\nget %s\r\n", k);
        r = send_all(c, hdr, (size_t)h) || send_all(c, B->a, n) ||
            send_all(c, get, (size_t)gl) || expect_line(c, "STORED", base + i) ||
            check_value(c, base + i, ver[i], B->a, B->b) || expect_line(c, "END", base + i);
    }
    atomic_fetch_add(&ops_done, 1);
    return r;
}

/* Thread t holds its share of the persistent connections open for the whole run (all 256 are
 * open at once) and goes round them, one operation each per round; between rounds it runs its
 * share of the short connections, so they come and go while the persistent ones are busy. */
static void *worker(void *arg) {
    int t = (int)(intptr_t)arg;
    struct bufs B = {malloc(maxsize + 8), malloc(maxsize + 8)};
    int from = t * npersist / nthreads, to = (t + 1) * npersist / nthreads;
    int np = to - from;
    struct pconn *P = calloc((size_t)(np ? np : 1), sizeof *P);
    if (!B.a || !B.b || !P) {
        fail("out of memory", 0);
        goto out;
    }
    int opened = 0;
    for (; opened < np; opened++)
        if (persistent_open(&P[opened], from + opened)) goto close;
    int rounds = nops > 0 ? nops : 1;
    for (int round = 0; round < rounds && !atomic_load(&failures); round++) {
        for (int i = 0; i < np && round < nops; i++)
            if (persistent_op(&P[i], &B)) goto close;
        /* this round's slice of the short connections (spread evenly over the rounds) */
        int share = nshort / (nthreads * rounds) + 1;
        for (int k = 0; k < share; k++) {
            int s = atomic_fetch_add(&next_short, 1);
            if (s >= nshort || short_conn(s, &B)) break;
        }
    }
    for (;;) {
        int s = atomic_fetch_add(&next_short, 1);
        if (s >= nshort || atomic_load(&failures)) break;
        if (short_conn(s, &B)) break;
    }
close:
    for (int i = 0; i < opened; i++) close(P[i].c.fd);
out:
    free(P);
    free(B.a);
    free(B.b);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s HOST PORT [-s short] [-p persistent] [-o ops] [-t threads] "
                        "[-x maxsize] [-r seed]\n", argv[0]);
        return 2;
    }
    memset(&srv, 0, sizeof srv);
    srv.sin_family = AF_INET;
    srv.sin_port = htons((uint16_t)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &srv.sin_addr) != 1) {
        fprintf(stderr, "bad address %s\n", argv[1]);
        return 2;
    }
    for (int i = 3; i + 1 < argc; i += 2) {
        long v = atol(argv[i + 1]);
        if (!strcmp(argv[i], "-s")) nshort = (int)v;
        else if (!strcmp(argv[i], "-p")) npersist = (int)v;
        else if (!strcmp(argv[i], "-o")) nops = (int)v;
        else if (!strcmp(argv[i], "-t")) nthreads = (int)v;
        else if (!strcmp(argv[i], "-x")) maxsize = (size_t)v;
        else if (!strcmp(argv[i], "-r")) seed = (uint64_t)v;
        else {
            fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (nthreads < 1 || maxsize < 1) return 2;
    pthread_t *t = calloc((size_t)nthreads, sizeof *t);
    struct timeval t0, t1;
    gettimeofday(&t0, NULL);
    for (int i = 0; i < nthreads; i++) pthread_create(&t[i], NULL, worker, (void *)(intptr_t)i);
    for (int i = 0; i < nthreads; i++) pthread_join(t[i], NULL);
    gettimeofday(&t1, NULL);
    free(t);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_usec - t0.tv_usec) / 1e6;
    int short_done = atomic_load(&next_short) < nshort ? atomic_load(&next_short) : nshort;
    printf("mc_stress: %d short + %d persistent connections, %llu operations, %llu values "
           "checked (%llu bytes), checksum got %016llx want %016llx, %d failure(s), %.1f s\n",
           short_done, npersist, (unsigned long long)atomic_load(&ops_done),
           (unsigned long long)atomic_load(&values_checked),
           (unsigned long long)atomic_load(&bytes_checked),
           (unsigned long long)atomic_load(&sum_got), (unsigned long long)atomic_load(&sum_want),
           atomic_load(&failures), secs);
    if (atomic_load(&failures) || atomic_load(&sum_got) != atomic_load(&sum_want) ||
        short_done < nshort || atomic_load(&values_checked) == 0)
        return 1;
    return 0;
}
