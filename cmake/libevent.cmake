# cmake/libevent.cmake — MP_WITH_LIBEVENT: libevent 2.1 from Debian's source package with the
# `megapipe` event method (backends/libevent/), its regression suite and memcached's t/ suite
# on top of it.  Everything third-party lives under ${CMAKE_BINARY_DIR}/libevent and
# ${CMAKE_BINARY_DIR}/memcached; the repository holds only our method, patch and scripts.
#
# Outputs:  ${MP_LIBEVENT_LIBDIR}/libevent-2.1.so.7, libevent_core-2.1.so.7, ... (drop-in:
#           LD_LIBRARY_PATH=${MP_LIBEVENT_LIBDIR} <program>)
#           ${MP_LIBEVENT_SRC}/test/regress (libevent's regression suite, built against them)

set(MP_LIBEVENT_WORK ${CMAKE_BINARY_DIR}/libevent)
set(MP_LIBEVENT_SRC ${MP_LIBEVENT_WORK}/src)
set(MP_LIBEVENT_LIBDIR ${MP_LIBEVENT_WORK}/lib)
set(MP_LE_DIR ${CMAKE_SOURCE_DIR}/backends/libevent)
file(GLOB MP_LIBEVENT_PATCHES CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/patches/libevent/*.patch)

add_custom_command(
  OUTPUT ${MP_LIBEVENT_WORK}/build.stamp
         ${MP_LIBEVENT_LIBDIR}/libevent-2.1.so.7
         ${MP_LIBEVENT_LIBDIR}/libevent_core-2.1.so.7
  BYPRODUCTS ${MP_LIBEVENT_LIBDIR}/libevent_core.so ${MP_LIBEVENT_LIBDIR}/libevent_pthreads.so
  COMMAND ${MP_LE_DIR}/build-libevent.sh ${MP_LIBEVENT_WORK} ${CMAKE_SOURCE_DIR}
          ${CMAKE_SOURCE_DIR}/include $<TARGET_FILE_DIR:megapipe> ${MP_LIBEVENT_LIBDIR}
  DEPENDS megapipe ${MP_LE_DIR}/megapipe_event.c ${MP_LE_DIR}/build-libevent.sh ${CMAKE_SOURCE_DIR}/scripts/debsrc.sh
          ${MP_LIBEVENT_PATCHES}
  COMMENT "libevent (Debian source) with the megapipe event method"
  USES_TERMINAL VERBATIM)
add_custom_target(libevent_megapipe ALL DEPENDS ${MP_LIBEVENT_WORK}/build.stamp)

# Our own check of the method: name, EVENT_NOMEGAPIPE, level/edge/close semantics, threads, fork.
add_executable(le_method_test ${MP_LE_DIR}/tests/le_method_test.c)
add_dependencies(le_method_test libevent_megapipe)
target_include_directories(le_method_test PRIVATE ${MP_LIBEVENT_SRC}/include)
target_compile_definitions(le_method_test PRIVATE _GNU_SOURCE)
target_link_libraries(le_method_test PRIVATE
  ${MP_LIBEVENT_LIBDIR}/libevent_core.so ${MP_LIBEVENT_LIBDIR}/libevent_pthreads.so
  Threads::Threads)
set_target_properties(le_method_test PROPERTIES BUILD_RPATH ${MP_LIBEVENT_LIBDIR})

if(MP_BUILD_TESTS)
  enable_testing()
  add_test(NAME libevent.method COMMAND le_method_test megapipe)
  set_tests_properties(libevent.method PROPERTIES SKIP_RETURN_CODE 77)
  add_test(NAME libevent.method_disabled COMMAND le_method_test epoll)
  set_tests_properties(libevent.method_disabled PROPERTIES ENVIRONMENT "EVENT_NOMEGAPIPE=1")
  add_test(NAME libevent.method_no_uring COMMAND le_method_test --no-uring epoll)
  set_tests_properties(libevent.method libevent.method_disabled libevent.method_no_uring
    PROPERTIES TIMEOUT 60)

  # libevent's own regression suite with the megapipe method, in a private network namespace
  # (some tests aim at outside addresses).  Exclusions: backends/libevent/regress-exclude.txt,
  # reasons in docs/libevent.md.
  add_test(NAME libevent.regress
    COMMAND ${MP_LE_DIR}/tests/run-regress.sh ${MP_LIBEVENT_SRC}
            ${MP_LE_DIR}/regress-exclude.txt)
  set_tests_properties(libevent.regress PROPERTIES TIMEOUT 900)

  # Debian's memcached binary (unmodified, scripts/setup.sh --full installs it) on our libevent
  # through LD_LIBRARY_PATH, checked with memcached's own t/ suite from its Debian source
  # package.  Exclusions: backends/libevent/memcached-t-exclude.txt, reasons in docs/libevent.md.
  find_program(MP_MEMCACHED_EXE memcached PATHS /usr/bin NO_DEFAULT_PATH)
  find_program(MP_PROVE_EXE prove)
  if(MP_MEMCACHED_EXE AND MP_PROVE_EXE)
    add_test(NAME libevent.memcached_t
      COMMAND ${MP_LE_DIR}/tests/run-memcached-t.sh ${CMAKE_BINARY_DIR}/memcached
              ${MP_LIBEVENT_LIBDIR} ${MP_LE_DIR}/memcached-t-exclude.txt)
    set_tests_properties(libevent.memcached_t PROPERTIES TIMEOUT 1800
      ENVIRONMENT "MEMCACHED_EXE=${MP_MEMCACHED_EXE}")
  else()
    message(WARNING "MP_WITH_LIBEVENT: no /usr/bin/memcached or prove (scripts/setup.sh --full): "
                    "memcached's t/ suite is not registered")
  endif()
endif()
