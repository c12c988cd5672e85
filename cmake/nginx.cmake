# cmake/nginx.cmake — MP_WITH_NGINX: ngx_megapipe_module, the `megapipe` event method, built
# as a dynamic module against Debian's nginx source package (configured like the installed
# /usr/sbin/nginx, plus --with-compat) and loaded by that stock binary.  Third-party sources
# live under ${CMAKE_BINARY_DIR}/nginx; the repository holds the module and the scripts.
#
# Output:  ${MP_NGINX_MODULE} (load_module it; `events { use megapipe; }`)
#
# libmegapipe is linked statically into the module (its symbols hidden): the .so needs no
# rpath into a build tree and no LD_LIBRARY_PATH (which nginx clears for its workers anyway),
# can be copied to /usr/lib/nginx/modules, and cannot meet another libmegapipe version.

set(MP_NGINX_WORK ${CMAKE_BINARY_DIR}/nginx)
set(MP_NGINX_MODULE ${MP_NGINX_WORK}/ngx_megapipe_module.so)
set(MP_NGX_DIR ${CMAKE_SOURCE_DIR}/backends/nginx)
set(MP_NGX_MOD_DIR ${CMAKE_SOURCE_DIR}/patches/nginx/ngx_megapipe_module)

add_custom_command(
  OUTPUT ${MP_NGINX_MODULE}
  COMMAND ${MP_NGX_DIR}/build-nginx-module.sh ${MP_NGINX_WORK}/build ${CMAKE_SOURCE_DIR}
          ${CMAKE_SOURCE_DIR}/include $<TARGET_FILE:megapipe_static> ${MP_NGINX_MODULE}
  DEPENDS megapipe_static ${MP_NGX_MOD_DIR}/ngx_megapipe_module.c ${MP_NGX_MOD_DIR}/config
          ${MP_NGX_DIR}/build-nginx-module.sh ${CMAKE_SOURCE_DIR}/include/megapipe.h
  COMMENT "nginx: ngx_megapipe_module.so (Debian source, --with-compat, make modules)"
  USES_TERMINAL VERBATIM)
add_custom_target(nginx_megapipe_module ALL DEPENDS ${MP_NGINX_MODULE})

if(MP_BUILD_TESTS)
  enable_testing()
  find_package(Python3 COMPONENTS Interpreter REQUIRED)
  # Stock /usr/sbin/nginx with the module loaded, each test in its own temp prefix on
  # 127.0.0.1 with free ports.  backends/nginx/tests/ngxtest.py is the harness.
  set(_ngx_tests load functional big_file https proxy many_connections reload partition epoll_engine
                timers)
  foreach(t ${_ngx_tests})
    add_test(NAME nginx.${t}
      COMMAND ${Python3_EXECUTABLE} ${MP_NGX_DIR}/tests/ngxtest.py ${t}
              --module ${MP_NGINX_MODULE} --loadgen $<TARGET_FILE:loadgen>)
    set_tests_properties(nginx.${t} PROPERTIES TIMEOUT 180 SKIP_RETURN_CODE 77)
  endforeach()
endif()
