# compat/run.cmake — included by compat/CMakeLists.txt (MP_BUILD_PRELOAD): the megapipe-run
# launcher and the preload.* tests (unmodified Debian memcached and nginx, a python3 asyncio
# server, and a small epoll echo server under the launcher).  docs/megapipe-run.md.
#
# Outputs:  ${CMAKE_CURRENT_BINARY_DIR}/megapipe-run (next to libmegapipe-preload.so, where it
#           looks first), installed to ${CMAKE_INSTALL_BINDIR}.
include(GNUInstallDirs)
set(MP_RUN_DIR ${CMAKE_CURRENT_LIST_DIR})

add_executable(megapipe-run ${MP_RUN_DIR}/megapipe-run.c)
# The build tree's libevent and libuv (cmake/libevent.cmake, cmake/libuv.cmake write their
# drop-in libraries there); the launcher adds those that exist when it runs.
if(IS_ABSOLUTE "${CMAKE_INSTALL_LIBDIR}")
  set(_mp_run_rel_libdir "")
else()
  set(_mp_run_rel_libdir "${CMAKE_INSTALL_LIBDIR}")
endif()
target_compile_definitions(megapipe-run PRIVATE
  MP_RUN_VERSION="${PROJECT_VERSION}"
  MP_RUN_INSTALLED="${CMAKE_INSTALL_FULL_LIBDIR}/megapipe/libmegapipe-preload.so"
  MP_RUN_REL_LIBDIR="${_mp_run_rel_libdir}"
  MP_RUN_LIBEVENT_DIR="${CMAKE_BINARY_DIR}/libevent/lib"
  MP_RUN_LIBUV_DIR="${CMAKE_BINARY_DIR}/libuv/lib")
set_target_properties(megapipe-run PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/compat)
if(TARGET megapipe_preload)
  add_dependencies(megapipe-run megapipe_preload)
endif()
install(TARGETS megapipe-run RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})

# The stress test's server: a plain level-triggered epoll program (no MegaPipe in it).
add_executable(epoll_echo ${MP_RUN_DIR}/tests/epoll_echo.c)
set_target_properties(epoll_echo PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/compat)

# The tests LD_PRELOAD a library into programs built without sanitizers: an ASan/UBSan build's
# preload cannot load there (the ASan runtime must come first), so they run in the normal
# build only (scripts/test.sh's first pass), labelled "preload".
if(MP_BUILD_TESTS AND NOT MP_SANITIZE)
  enable_testing()
  find_package(Python3 COMPONENTS Interpreter)
  if(NOT Python3_Interpreter_FOUND)
    message(WARNING "megapipe-run: no python3: the preload.* tests are not registered")
  else()
    set(_mp_run $<TARGET_FILE:megapipe-run>)
    set(_mp_t ${MP_RUN_DIR}/tests)
    # The launcher itself: options, exit statuses, what it sets.
    add_test(NAME preload.launcher COMMAND ${Python3_EXECUTABLE} ${_mp_t}/test_launcher.py ${_mp_run})
    # 10,000 short checksummed connections + hostile peers against epoll_echo, with the preload
    # and (control) with --disable.
    add_test(NAME preload.stress
      COMMAND ${Python3_EXECUTABLE} ${_mp_t}/test_stress.py ${_mp_run} $<TARGET_FILE:epoll_echo>)
    add_test(NAME preload.stress_disabled
      COMMAND ${Python3_EXECUTABLE} ${_mp_t}/test_stress.py --disable ${_mp_run}
              $<TARGET_FILE:epoll_echo>)
    add_test(NAME preload.asyncio
      COMMAND ${Python3_EXECUTABLE} ${_mp_t}/test_asyncio.py ${_mp_run})
    set(_mp_run_tests preload.launcher preload.stress preload.stress_disabled preload.asyncio)
    # Debian's memcached and nginx (scripts/setup.sh --full); 77 = skipped when absent.
    add_test(NAME preload.memcached
      COMMAND ${Python3_EXECUTABLE} ${_mp_t}/test_memcached.py ${_mp_run})
    add_test(NAME preload.nginx
      COMMAND ${Python3_EXECUTABLE} ${_mp_t}/test_nginx.py ${_mp_run})
    set_tests_properties(preload.memcached PROPERTIES
      ENVIRONMENT "MP_LIBEVENT_LIBDIR=${CMAKE_BINARY_DIR}/libevent/lib")
    list(APPEND _mp_run_tests preload.memcached preload.nginx)
    # A subset of memcached's own t/ suite (its Debian source package, fetched once into
    # the build tree) through backends/memcached/tests/run-t.sh.
    find_program(MP_PROVE_EXE prove)
    if(MP_PROVE_EXE)
      add_test(NAME preload.memcached_t
        COMMAND ${MP_RUN_DIR}/tests/run-memcached-t.sh ${_mp_run} ${CMAKE_BINARY_DIR}/compat/memcached-t
                ${CMAKE_SOURCE_DIR}/backends/memcached/tests/run-t.sh)
      list(APPEND _mp_run_tests preload.memcached_t)
    endif()
    # Stream mode (MEGAPIPE_STREAMS=1, --streams): the same programs and checks, and each must
    # show connections adopted as streams (the "streams N" statistics line).
    add_test(NAME preload.stress_streams
      COMMAND ${Python3_EXECUTABLE} ${_mp_t}/test_stress.py --streams ${_mp_run} $<TARGET_FILE:epoll_echo>)
    add_test(NAME preload.asyncio_streams
      COMMAND ${Python3_EXECUTABLE} ${_mp_t}/test_asyncio.py --streams ${_mp_run})
    add_test(NAME preload.memcached_streams
      COMMAND ${Python3_EXECUTABLE} ${_mp_t}/test_memcached.py --streams ${_mp_run})
    set_tests_properties(preload.memcached_streams PROPERTIES
      ENVIRONMENT "MP_LIBEVENT_LIBDIR=${CMAKE_BINARY_DIR}/libevent/lib")
    add_test(NAME preload.nginx_streams
      COMMAND ${Python3_EXECUTABLE} ${_mp_t}/test_nginx.py --streams ${_mp_run})
    list(APPEND _mp_run_tests preload.stress_streams preload.asyncio_streams
         preload.memcached_streams preload.nginx_streams)
    if(MP_PROVE_EXE)
      add_test(NAME preload.memcached_t_streams
        COMMAND ${MP_RUN_DIR}/tests/run-memcached-t.sh ${_mp_run} ${CMAKE_BINARY_DIR}/compat/memcached-t
                ${CMAKE_SOURCE_DIR}/backends/memcached/tests/run-t.sh)
      # the same work directory as preload.memcached_t: never at the same time
      set_tests_properties(preload.memcached_t preload.memcached_t_streams PROPERTIES
        RESOURCE_LOCK mp_memcached_t)
      set_tests_properties(preload.memcached_t_streams PROPERTIES ENVIRONMENT "MEGAPIPE_STREAMS=1")
      list(APPEND _mp_run_tests preload.memcached_t_streams)
    endif()
    set_tests_properties(${_mp_run_tests} PROPERTIES LABELS preload TIMEOUT 240 SKIP_RETURN_CODE 77)
  endif()
endif()
