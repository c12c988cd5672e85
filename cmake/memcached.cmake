# cmake/memcached.cmake — MP_WITH_MEMCACHED: memcached adapted to MegaPipe (the paper's §4.2).
# Debian's memcached source package, patched by patches/memcached/*.patch to hook in
# backends/memcached/mp_memcached.c (worker threads on channels), built into
# ${CMAKE_BINARY_DIR}/memcached-megapipe.  Third-party sources live under
# ${CMAKE_BINARY_DIR}/memcached-mp; the repository holds only our code, patch and scripts.
# Tests (memcached.*): memcached's own t/ suite over TCP, and over unix sockets for the tests
# that use them; our checksummed stress; -d/-u and the start-up checks.  docs/memcached.md.

set(MP_MEMCACHED_WORK ${CMAKE_BINARY_DIR}/memcached-mp)
set(MP_MEMCACHED_EXE ${CMAKE_BINARY_DIR}/memcached-megapipe)
set(MP_MC_DIR ${CMAKE_SOURCE_DIR}/backends/memcached)
file(GLOB MP_MEMCACHED_PATCHES CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/patches/memcached/*.patch)

add_custom_command(
  OUTPUT ${MP_MEMCACHED_WORK}/build.stamp ${MP_MEMCACHED_EXE}
  COMMAND ${MP_MC_DIR}/build-memcached.sh ${MP_MEMCACHED_WORK} ${CMAKE_SOURCE_DIR}
          ${CMAKE_SOURCE_DIR}/include $<TARGET_FILE_DIR:megapipe> ${MP_MEMCACHED_EXE}
  DEPENDS megapipe ${CMAKE_SOURCE_DIR}/scripts/debsrc.sh ${MP_MC_DIR}/mp_memcached.c ${MP_MC_DIR}/mp_memcached.h
          ${MP_MC_DIR}/build-memcached.sh ${MP_MEMCACHED_PATCHES}
  COMMENT "memcached (Debian source) adapted to MegaPipe"
  USES_TERMINAL VERBATIM)
add_custom_target(memcached_megapipe ALL DEPENDS ${MP_MEMCACHED_WORK}/build.stamp)

# The checksummed stress client (our code: the project's warning rules apply).
add_executable(mc_stress ${MP_MC_DIR}/tests/mc_stress.c)
target_compile_definitions(mc_stress PRIVATE _GNU_SOURCE)
target_link_libraries(mc_stress PRIVATE Threads::Threads m)

if(MP_BUILD_TESTS)
  enable_testing()
  find_program(MP_PROVE_EXE prove)
  # memcached's t/ suite (from the source package) against memcached-megapipe, inside a private
  # network namespace.  "tcp": every test over TCP (the partitioned listeners); "unix": the
  # tests that exercise unix sockets and the dispatcher's hand-off.  Exclusions with reasons:
  # backends/memcached/t-exclude.txt, docs/memcached.md.
  if(MP_PROVE_EXE)
    foreach(mode tcp unix)
      add_test(NAME memcached.t_${mode}
        COMMAND ${MP_MC_DIR}/tests/run-t.sh ${mode} ${MP_MEMCACHED_WORK}/src ${MP_MEMCACHED_EXE}
                ${MP_MC_DIR}/t-exclude.txt)
      set_tests_properties(memcached.t_${mode} PROPERTIES TIMEOUT 1200)
    endforeach()
  else()
    message(WARNING "MP_WITH_MEMCACHED: no prove (perl): memcached's t/ suite is not registered")
  endif()
  # 10,000 short + 256 persistent connections, 1 B - 512 KiB values, every value checked.
  add_test(NAME memcached.stress
    COMMAND ${MP_MC_DIR}/tests/run-stress.sh ${MP_MEMCACHED_EXE} $<TARGET_FILE:mc_stress>)
  set_tests_properties(memcached.stress PROPERTIES TIMEOUT 600)
  # -d, -u, MEMCACHED_MEGAPIPE=0, options that stay on the stock path, failures at start-up.
  add_test(NAME memcached.startup
    COMMAND ${MP_MC_DIR}/tests/run-startup.sh ${MP_MEMCACHED_EXE} ${MP_MEMCACHED_WORK}/src/t)
  set_tests_properties(memcached.startup PROPERTIES TIMEOUT 300)
endif()
