#!/usr/bin/env python3
"""gen_fileset.py — generate the file sets of the paper's HTTP workloads (§5.3), stdlib only.

    bench/gen_fileset.py MIX OUTDIR        MIX = specweb | yahoo | yahoo2

Writes OUTDIR/docroot/<MIX>/f<i>.bin (the files, to serve with nginx or any static server),
OUTDIR/<MIX>.list (lines "PATH WEIGHT" for loadgen -f) and prints the loadgen arguments:

  specweb  SpecWeb-like: 36 files from 30 B to 5,670 B (log-spaced), request weights chosen
           so that the mean response body is 704 B; 6 requests per connection.
  yahoo    Yahoo-like (synthetic, not the trace): 1,000 files, heavy-tailed sizes (Pareto,
           alpha 1.1, minimum 128 B, capped at 4 MiB), Zipf(0.8) popularity; requests per
           connection Zipf-like with mean 2.3 (loadgen -Z 2.3).
  yahoo2   the same with every size halved (the paper's "/2" variant).

Deterministic (fixed seed), so two machines get the same set.  Not committed: generate it.
"""
import os
import random
import sys


def specweb():
    n, lo, hi, target = 36, 30, 5670, 704.0
    sizes = [round(lo * (hi / lo) ** (i / (n - 1))) for i in range(n)]

    def mean(a):
        w = [s ** -a for s in sizes]
        return sum(s * x for s, x in zip(sizes, w)) / sum(w)
    a_lo, a_hi = 0.0, 3.0  # mean falls as a grows
    for _ in range(100):
        mid = (a_lo + a_hi) / 2
        if mean(mid) > target:
            a_lo = mid
        else:
            a_hi = mid
    a = (a_lo + a_hi) / 2
    weights = [s ** -a for s in sizes]
    return sizes, weights, ["-n", "6"]


def yahoo(halve):
    rnd = random.Random(42)
    n = 1000
    sizes = [min(4 << 20, int(128 / (1 - rnd.random()) ** (1 / 1.1))) for _ in range(n)]
    if halve:
        sizes = [max(1, s // 2) for s in sizes]
    ranks = list(range(1, n + 1))
    rnd.shuffle(ranks)
    weights = [r ** -0.8 for r in ranks]
    return sizes, weights, ["-Z", "2.3"]


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("specweb", "yahoo", "yahoo2"):
        sys.exit(__doc__)
    mix, out = sys.argv[1], sys.argv[2]
    sizes, weights, extra = specweb() if mix == "specweb" else yahoo(mix == "yahoo2")
    root = os.path.join(out, "docroot", mix)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(out, mix + ".list"), "w") as lst:
        for i, (s, w) in enumerate(zip(sizes, weights)):
            with open(os.path.join(root, "f%d.bin" % i), "wb") as f:
                f.write(b"x" * s)
            lst.write("/%s/f%d.bin %.6g\n" % (mix, i, w))
    tot = sum(weights)
    mean = sum(s * w for s, w in zip(sizes, weights)) / tot
    print("# %s: %d files, %d..%d B, request-weighted mean %.0f B; docroot %s" % (
        mix, len(sizes), min(sizes), max(sizes), mean, os.path.join(out, "docroot")),
        file=sys.stderr)
    print(" ".join(["-m", "http", "-f", os.path.join(out, mix + ".list")] + extra))


if __name__ == "__main__":
    main()
