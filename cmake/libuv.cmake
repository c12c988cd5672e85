# cmake/libuv.cmake — MP_WITH_LIBUV: libuv 1.44 from Debian's source package with the MegaPipe
# poller (backends/libuv/), chosen at run time by UV_USE_MEGAPIPE=1; libuv's own test runner
# and our tests on top of it.  Everything third-party lives under ${CMAKE_BINARY_DIR}/libuv;
# the repository holds only our code, patch and scripts.
#
# Outputs:  ${MP_LIBUV_LIBDIR}/libuv.so.1 (drop-in: LD_LIBRARY_PATH=${MP_LIBUV_LIBDIR} and
#           UV_USE_MEGAPIPE=1 <program>)
#           ${MP_LIBUV_WORK}/build/uv_run_tests (libuv's runner, linked against it)

set(MP_LIBUV_WORK ${CMAKE_BINARY_DIR}/libuv)
set(MP_LIBUV_SRC ${MP_LIBUV_WORK}/src)
set(MP_LIBUV_LIBDIR ${MP_LIBUV_WORK}/lib)
set(MP_UV_DIR ${CMAKE_SOURCE_DIR}/backends/libuv)
file(GLOB MP_LIBUV_PATCHES CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/patches/libuv/*.patch)

add_custom_command(
  OUTPUT ${MP_LIBUV_WORK}/build.stamp ${MP_LIBUV_LIBDIR}/libuv.so.1
  BYPRODUCTS ${MP_LIBUV_LIBDIR}/libuv.so ${MP_LIBUV_WORK}/build/uv_run_tests
  COMMAND ${MP_UV_DIR}/build-libuv.sh ${MP_LIBUV_WORK} ${CMAKE_SOURCE_DIR}
          ${CMAKE_SOURCE_DIR}/include $<TARGET_FILE_DIR:megapipe> ${MP_LIBUV_LIBDIR}
  DEPENDS megapipe ${CMAKE_SOURCE_DIR}/scripts/debsrc.sh ${MP_UV_DIR}/uv-megapipe.c ${MP_UV_DIR}/uv-megapipe.h
          ${MP_UV_DIR}/uv-megapipe-tcp.c ${MP_UV_DIR}/uv-megapipe-int.h
          ${MP_UV_DIR}/build-libuv.sh ${MP_LIBUV_PATCHES}
  COMMENT "libuv (Debian source) with the MegaPipe poller"
  USES_TERMINAL VERBATIM)
add_custom_target(libuv_megapipe ALL DEPENDS ${MP_LIBUV_WORK}/build.stamp)

if(MP_BUILD_TESTS)
  enable_testing()
  # libuv's own runner with UV_USE_MEGAPIPE=1, in a private network namespace with loopback
  # up, tests in parallel.  Exclusions: backends/libuv/uv-tests-exclude.txt, reasons in
  # docs/libuv.md.
  add_test(NAME libuv.run_tests
    COMMAND ${MP_UV_DIR}/tests/run-uv-tests.sh ${MP_LIBUV_WORK}/build/uv_run_tests
            ${MP_LIBUV_SRC} ${MP_UV_DIR}/uv-tests-exclude.txt)
  set_tests_properties(libuv.run_tests PROPERTIES TIMEOUT 600 ENVIRONMENT "UV_USE_MEGAPIPE=1")
  # ... and with TCP on readiness watches too (UV_MEGAPIPE_TCP=0), the other half of the switch.
  add_test(NAME libuv.run_tests_readiness
    COMMAND ${MP_UV_DIR}/tests/run-uv-tests.sh ${MP_LIBUV_WORK}/build/uv_run_tests
            ${MP_LIBUV_SRC} ${MP_UV_DIR}/uv-tests-exclude.txt)
  set_tests_properties(libuv.run_tests_readiness PROPERTIES TIMEOUT 600
    ENVIRONMENT "UV_USE_MEGAPIPE=1;UV_MEGAPIPE_TCP=0")
endif()

# Our checks of the switch, the fallback and the traps io_uring brought upstream libuv.
add_executable(uv_megapipe_test ${MP_UV_DIR}/tests/uv_megapipe_test.c)
add_dependencies(uv_megapipe_test libuv_megapipe)
target_include_directories(uv_megapipe_test PRIVATE ${MP_LIBUV_SRC}/include)
target_link_libraries(uv_megapipe_test PRIVATE ${MP_LIBUV_LIBDIR}/libuv.so.1 Threads::Threads)
set_target_properties(uv_megapipe_test PROPERTIES BUILD_RPATH ${MP_LIBUV_LIBDIR})

if(MP_BUILD_TESTS)
  foreach(c switch fork setuid fd_reuse cq_overflow seccomp tcp tcp_readiness reuseport share)
    add_test(NAME libuv.${c} COMMAND uv_megapipe_test ${c})
    set_tests_properties(libuv.${c} PROPERTIES TIMEOUT 120 SKIP_RETURN_CODE 77)
  endforeach()
endif()

# The benchmark's server (backends/libuv/bench/bench-libuv.sh runs it against bench/'s loadgen).
if(MP_BUILD_BENCH)
  add_executable(uv_bench_server ${MP_UV_DIR}/bench/uv_bench_server.c)
  add_dependencies(uv_bench_server libuv_megapipe)
  target_include_directories(uv_bench_server PRIVATE ${MP_LIBUV_SRC}/include)
  target_link_libraries(uv_bench_server PRIVATE ${MP_LIBUV_LIBDIR}/libuv.so.1)
  set_target_properties(uv_bench_server PROPERTIES BUILD_RPATH ${MP_LIBUV_LIBDIR})
endif()

if(MP_BUILD_TESTS)
  # An unmodified Debian program that links libuv.so.1 dynamically (hddemux, installed by
  # scripts/setup.sh --full) on our library with UV_USE_MEGAPIPE=1, real HTTP and DNS traffic.
  add_test(NAME libuv.hddemux
    COMMAND python3 ${MP_UV_DIR}/tests/run-hddemux.py ${MP_LIBUV_LIBDIR})
  set_tests_properties(libuv.hddemux PROPERTIES TIMEOUT 120 SKIP_RETURN_CODE 77)
endif()
