// main.cc — the test binary's entry point: googletest's, plus `-h` as a synonym of `--help`
// (googletest 1.12 knows only `--help`, and would run the whole suite on `-h`).
#include <gtest/gtest.h>

#include <cstring>

int main(int argc, char **argv) {
    static char help[] = "--help";
    for (int i = 1; i < argc; i++)
        if (std::strcmp(argv[i], "-h") == 0) argv[i] = help;
    testing::InitGoogleTest(&argc, argv);
    return RUN_ALL_TESTS();
}
