# CFQT_STATIC_DEPS (issue 15): the `cfqt` executable links the static archives Debian ships for
# its permissively licensed dependencies -- KJ and Cap'n Proto (MIT), ngtcp2 and its GnuTLS crypto
# helper (MIT), nghttp2 (MIT), c-ares (MIT), yaml-cpp (MIT), OpenSSL 3 (Apache-2.0, through
# kj-tls) -- instead of 20-odd shared objects, with --gc-sections and packed relative relocations
# (DT_RELR). The dynamic loader then maps and relocates 6 objects instead of 28, which is most of
# exec -> main, and only the code cfqt uses is mapped (bench/results/tunnel.md).
#
# Stay shared: GnuTLS and what it loads (nettle, hogweed, gmp, libtasn1, libidn2, libunistring,
# p11-kit: LGPL/GPL, so a user must be able to relink cfqt against a modified copy, which a
# shared library allows without our object files), and libc. libstdc++ and libgcc are linked
# statically too (their runtime exception allows it).
#
# Only targets that ask for it (cfqt_use_static_deps) get the archives: libcfqt.so, the tests and
# the benchmarks keep the shared libraries. Debian's archives are position-independent, so the
# executable stays PIE.
option(CFQT_STATIC_DEPS
    "Link the cfqt executable against static KJ/capnp/ngtcp2/nghttp2/c-ares/yaml-cpp/OpenSSL" ON)

set(CFQT_STATIC_DEPS_ALLOWED kj kj-async kj-http kj-tls capnp capnp-rpc capnp-json capnpc ngtcp2
    ngtcp2_crypto_gnutls nghttp2 cares yaml-cpp)

# cfqt_static_deps_for(PkgConfig::X ...): each shared library of the allowed list in these
# imported targets' link interface becomes "the .a for a target whose CFQT_STATIC_DEPS property
# is on, the .so for every other target".
function(cfqt_static_deps_for)
  foreach(target ${ARGN})
    get_target_property(libs ${target} INTERFACE_LINK_LIBRARIES)
    if(NOT libs)
      continue()
    endif()
    set(on "$<BOOL:$<TARGET_PROPERTY:CFQT_STATIC_DEPS>>")
    set(result)
    foreach(lib IN LISTS libs)
      if(lib MATCHES "^(.*)/lib([^/]+)\\.so$")
        set(dir ${CMAKE_MATCH_1})
        set(name ${CMAKE_MATCH_2})
        if(name IN_LIST CFQT_STATIC_DEPS_ALLOWED AND EXISTS ${dir}/lib${name}.a)
          list(APPEND result "$<${on}:${dir}/lib${name}.a>" "$<$<NOT:${on}>:${lib}>")
          if(name STREQUAL "kj-tls")
            # kj-tls.pc names no OpenSSL (its .so carries the dependency).
            list(APPEND result "$<${on}:${dir}/libssl.a>" "$<${on}:${dir}/libcrypto.a>")
          elseif(name STREQUAL "ngtcp2_crypto_gnutls")
            # The helper calls into ngtcp2, which libngtcp2_crypto_gnutls.pc lists before it.
            list(APPEND result "$<${on}:${dir}/libngtcp2.a>")
          endif()
          continue()
        endif()
      endif()
      list(APPEND result "${lib}")
    endforeach()
    set_target_properties(${target} PROPERTIES INTERFACE_LINK_LIBRARIES "${result}")
  endforeach()
endfunction()

# cfqt_use_static_deps(target): link `target` (an executable) with the archives above.
function(cfqt_use_static_deps target)
  if(NOT CFQT_STATIC_DEPS)
    return()
  endif()
  get_directory_property(options COMPILE_OPTIONS)
  if("${CMAKE_CXX_FLAGS};${options}" MATCHES "-fsanitize=thread")
    # A ThreadSanitizer build's suppressions name Debian's shared KJ/capnp libraries.
    return()
  endif()
  set_target_properties(${target} PROPERTIES CFQT_STATIC_DEPS ON)
  target_link_options(${target} PRIVATE -Wl,--gc-sections -Wl,-z,pack-relative-relocs -Wl,-O1
      -pthread)
  # The link map says which archive member each byte of the executable comes from: bench/rss-map
  # attributes the resident pages of an idle client with it.
  target_link_options(${target} PRIVATE -Wl,-Map=$<TARGET_FILE:${target}>.map)
  if(NOT "${CMAKE_CXX_FLAGS};${options}" MATCHES "-fsanitize")
    # libstdc++ and libgcc too (GCC Runtime Library Exception: any license may link them
    # statically): -1.4 MiB of idle RSS and ~3 ms of start-up (bench/results/tunnel.md). Not in
    # sanitizer builds, whose runtimes replace operator new/delete from a shared object.
    target_link_options(${target} PRIVATE -static-libstdc++ -static-libgcc)
  endif()
endfunction()
