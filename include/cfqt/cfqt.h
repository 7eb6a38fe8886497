/* cfqt C API (for FFI): run a Cloudflare quick tunnel inside the process. Thread-safe.
 *
 *   cfqt_options o;
 *   cfqt_options_init(&o);
 *   o.url = "http://localhost:8080";
 *   char error[256], url[256];
 *   cfqt_tunnel* t = cfqt_tunnel_start(&o, error, sizeof error);   // NULL: see `error`
 *   if (t && cfqt_tunnel_wait_url(t, 30000, url, sizeof url) == 0) puts(url);
 *   ...
 *   cfqt_tunnel_free(t);                                             // graceful stop + free
 *
 * Linking: inside the cfqt CMake build, `target_link_libraries(app PRIVATE cfqt::cfqt)` (a
 * static library; its KJ/Cap'n Proto/ngtcp2/GnuTLS/c-ares dependencies come with the target
 * and need the C++ linker, which CMake picks on its own). See tests/api-example/. */
#ifndef CFQT_CFQT_H_
#define CFQT_CFQT_H_

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cfqt_tunnel cfqt_tunnel;

typedef struct cfqt_ingress_rule {
  const char* hostname;         /* NULL or "" = any; "*.example.com" = any subdomain */
  const char* path;             /* NULL or "" = any; else a POSIX extended regex */
  const char* service;          /* http://..., unix:/path, http_status:NNN, hello_world */
} cfqt_ingress_rule;

typedef struct cfqt_options {
  const char* url;              /* origin URL, or NULL with hello_world = 1 */
  int hello_world;
  const char* quick_service;    /* NULL = https://api.trycloudflare.com */
  const char* const* edges;     /* host:port list (NULL = discovery) */
  size_t edge_count;
  const char* edge_ca_file;     /* NULL = embedded Cloudflare roots + system store */
  int ha_connections;           /* 1..4 */
  int grace_period_ms;
  int metrics;                  /* non-zero: serve /ready, /quicktunnel, /healthcheck */
  const char* metrics_address;  /* NULL = first free of localhost:20241..20245 */
  const char* log_level;        /* NULL = "info" */
  const char* unix_socket;      /* origin: an HTTP server on this unix socket (url NULL) */
  int backoff_base_ms;          /* reconnect backoff base (default 1000) */
  const char* protocol;         /* NULL = "auto"; "quic" or "http2" (TLS over TCP) */
  /* Named tunnel (instead of a quick tunnel): its token, or its credentials file's JSON or
   * path; then cfqt_tunnel_wait_url() has no URL to give (use cfqt_tunnel_wait_ready()). */
  const char* token;
  const char* credentials_json;
  const char* credentials_file;
  const cfqt_ingress_rule* ingress;  /* named tunnels: first match wins, the last rule must */
  size_t ingress_count;              /* match everything */
} cfqt_options;

void cfqt_options_init(cfqt_options* options);
/* Fills the defaults (2 HA connections, 30 s grace period, 1 s backoff base, info logs, no
 * metrics). */

cfqt_tunnel* cfqt_tunnel_start(const cfqt_options* options, char* error, size_t error_size);
/* NULL on invalid options (message copied into `error`, NUL-terminated, if given). `options`
 * NULL means the defaults (which fail: nothing to expose). */

int cfqt_tunnel_wait_url(cfqt_tunnel* tunnel, int timeout_ms, char* url, size_t url_size);
/* 0 and the public URL in `url` once issued; -1 on timeout or start-up failure; -2 if `url` is
 * too small. */

int cfqt_tunnel_wait_ready(cfqt_tunnel* tunnel, int timeout_ms);
/* 1 once at least one edge connection is registered, 0 on timeout or if the tunnel ended. */

int cfqt_tunnel_ready_connections(cfqt_tunnel* tunnel);

int cfqt_tunnel_stop(cfqt_tunnel* tunnel);
/* Graceful shutdown; returns the exit status (0 = clean). */

void cfqt_tunnel_free(cfqt_tunnel* tunnel);
/* Stops if needed and frees. */

#ifdef __cplusplus
}
#endif

#endif /* CFQT_CFQT_H_ */
