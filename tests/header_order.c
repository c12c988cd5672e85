/*
 * header_order.c — megapipe.h in any include order: plain C11 (no _GNU_SOURCE anywhere), a
 * system header first, then megapipe.h, and the CPU_* macros a cpu_mask needs still work.
 * Built and run by ctest (header.include_order); a header that depended on _GNU_SOURCE coming
 * first would fail to compile here.
 */
#include <stdio.h>
#include <string.h>

#include <megapipe.h>

int main(int argc, char **argv) {
    if (argc > 1 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))) {
        puts("usage: header_order  (checks that megapipe.h works after <stdio.h> in plain C11)");
        return 0;
    }
    cpu_set_t m;
    CPU_ZERO(&m);
    CPU_SET(1, &m);
    if (!CPU_ISSET(1, &m) || CPU_ISSET(0, &m) || CPU_COUNT(&m) != 1) {
        fputs("CPU_* macros wrong\n", stderr);
        return 1;
    }
    if (mp_version() != MEGAPIPE_VERSION) {
        fputs("library and header versions differ\n", stderr);
        return 1;
    }
    printf("megapipe %s: header fine in any include order\n", mp_version_string());
    return 0;
}
