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
typedef struct cfqt_request cfqt_request;

typedef void (*cfqt_handler_fn)(void* user_data, cfqt_request* request);
/* In-process serving: called on one of the tunnel's handler threads (never its event loop) for
 * each request, which the callee owns from then on and must release with cfqt_request_free(),
 * from any thread, after answering it (or not). It may block or return at once. */

/* Log levels of cfqt_log_fn. */
enum { CFQT_LOG_DEBUG = 0, CFQT_LOG_INFO = 1, CFQT_LOG_WARN = 2, CFQT_LOG_ERROR = 3,
       CFQT_LOG_FATAL = 4 };

typedef struct cfqt_log_field {
  const char* key;
  const char* value;   /* unescaped: may hold any bytes a peer sent (cut at a NUL byte) */
} cfqt_log_field;

typedef void (*cfqt_log_fn)(void* user_data, int level, const char* message,
                            const cfqt_log_field* fields, size_t field_count);
/* One log line: the sentence and its key/value fields in order (rate-limit summaries have the
 * fields "suppressed" and "interval"). The strings are valid during the call only. Called on
 * the tunnel's own threads, never by two threads at once; it must return quickly and must not
 * call cfqt_tunnel_* functions on the same tunnel. */

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
  cfqt_log_fn log_callback;     /* non-NULL: log lines go to it instead of stderr */
  void* log_user_data;          /* passed to log_callback */
  /* Readiness (cfqt_tunnel_wait_serving; with wait_ready, cfqt_tunnel_wait_url too). */
  int wait_ready;               /* non-zero: the URL is given only once it serves */
  int ready_timeout_ms;         /* 0 = 60000 */
  const char* const* ready_resolvers;  /* ip:port[#tls-name] DoT resolvers (NULL = 1.1.1.1 and
                                          1.0.0.1:853, cloudflare-dns.com) */
  size_t ready_resolver_count;
  int ready_port;               /* 0 = 443 */
  const char* ready_ca_file;    /* NULL = system trust store */
  cfqt_handler_fn handler;      /* in-process serving instead of an origin (url etc. NULL) */
  void* handler_data;           /* passed to `handler` */
  int handler_threads;          /* handler calls running at once (0 = 64; -1 = inline on the
                                   tunnel's event-loop thread: must not block) */
  /* Named tunnel (instead of a quick tunnel): its token, or its credentials file's JSON or
   * path; then cfqt_tunnel_wait_url() has no URL to give (use cfqt_tunnel_wait_ready()). */
  const char* token;
  const char* credentials_json;
  const char* credentials_file;
  const cfqt_ingress_rule* ingress;  /* named tunnels: first match wins, the last rule must */
  size_t ingress_count;              /* match everything */
  /* https:// and unix+tls: origins (as --origin-ca-pool, --origin-server-name). */
  const char* origin_ca_pool;        /* NULL = the system trust store only */
  const char* origin_server_name;    /* NULL = the origin URL's host */
  /* protocol "auto" (as --fallback-after, --quic-retry-interval, --quic-failure-limit,
   * --quic-failure-window); 0 = the default. */
  int fallback_after_ms;             /* 0 = 2000 */
  int quic_retry_interval_ms;        /* 0 = 300000 */
  int quic_failure_limit;            /* 0 = 3; -1 = never move to HTTP/2 for QUIC failures */
  int quic_failure_window_ms;        /* 0 = 60000 */
  int threads;                       /* 0 = auto (an event loop per HA connection when more than
                                        one CPU is usable), 1 = one event loop */
  int busy_poll_us;                  /* as --busy-poll: poll this long after each packet to or
                                        from the edge instead of sleeping (0 = off, at most
                                        10000) */
  int release_idle_code;             /* 1 = as cfqt --release-idle-code: when the tunnel idles,
                                        drop this process's page-table entries of code and
                                        read-only data (lower RSS, minor faults on the next
                                        request); 0 = off (the default) */
} cfqt_options;

#define CFQT_STAGE_TUNNEL 1     /* no quick tunnel / edge connections yet */
#define CFQT_STAGE_DNS 2        /* the hostname does not resolve via the public resolvers yet */
#define CFQT_STAGE_ROUTING 3    /* it resolves, but the edge does not route it here yet */

void cfqt_options_init(cfqt_options* options);
/* Fills the defaults (2 HA connections, 30 s grace period, 1 s backoff base, info logs, no
 * metrics). */

size_t cfqt_options_size(void);
/* sizeof(cfqt_options) in this library: bindings that mirror the struct (ctypes, FFI) check
 * their layout against it before calling cfqt_options_init(). */

cfqt_tunnel* cfqt_tunnel_start(const cfqt_options* options, char* error, size_t error_size);
/* NULL on invalid options (message copied into `error`, NUL-terminated, if given). `options`
 * NULL means the defaults (which fail: nothing to expose). */

int cfqt_tunnel_wait_url(cfqt_tunnel* tunnel, int timeout_ms, char* url, size_t url_size);
/* 0 and the public URL in `url` once issued; -1 on timeout or start-up failure; -2 if `url` is
 * too small. */

int cfqt_tunnel_wait_ready(cfqt_tunnel* tunnel, int timeout_ms);
/* 1 once at least one edge connection is registered, 0 on timeout or if the tunnel ended. */

int cfqt_tunnel_wait_serving(cfqt_tunnel* tunnel, int timeout_ms, char* error, size_t error_size);
/* 0 once the public URL serves (DNS visible via public resolvers asked directly, then an HTTPS
 * request routed through the edge to this tunnel); otherwise the CFQT_STAGE_* that did not
 * succeed in time, with a message in `error` (if given). */

int cfqt_tunnel_ready_connections(cfqt_tunnel* tunnel);

int cfqt_tunnel_stop(cfqt_tunnel* tunnel);
/* Graceful shutdown; returns the exit status (0 = clean). */

void cfqt_tunnel_free(cfqt_tunnel* tunnel);
/* Stops if needed and frees. */

int cfqt_tunnel_running(cfqt_tunnel* tunnel);
/* 1 while the tunnel runs, 0 once it ended (stopped, or every connection refused for good). */

size_t cfqt_tunnel_metrics(cfqt_tunnel* tunnel, char* out, size_t out_size);
/* The /metrics page (Prometheus text) copied into `out` (NUL-terminated, cut to fit); returns the
 * size needed including the NUL (1 once the tunnel ended). */

const char* cfqt_last_error(void);
/* The message of the last cfqt_request_* call that failed on this thread. */

/* In-process requests (see cfqt/handler.h for the model). Every function is thread-safe; the
 * blocking ones (read, write) block only the calling thread. Calls returning int give 0 on
 * success, -1 if the request was cancelled (the visitor went away or the tunnel stopped) and -2
 * on misuse (answered twice, write before respond or after end, invalid status or header); the
 * message is in cfqt_last_error(). Strings stay valid until cfqt_request_free(). */

const char* cfqt_request_method(const cfqt_request* request);
const char* cfqt_request_url(const cfqt_request* request);   /* "https://host/path?query" */
const char* cfqt_request_path(const cfqt_request* request);  /* "/path?query" */
const char* cfqt_request_host(const cfqt_request* request);
size_t cfqt_request_header_count(const cfqt_request* request);
const char* cfqt_request_header_name(const cfqt_request* request, size_t index);
const char* cfqt_request_header_value(const cfqt_request* request, size_t index);
int cfqt_request_is_websocket(const cfqt_request* request);
/* 1 for a WebSocket upgrade: answer 101, then read/write are the session's raw bytes. */

long long cfqt_request_read(cfqt_request* request, void* buffer, size_t size);
/* Request body bytes (blocking until some arrive): > 0 bytes, 0 at the end of the body, -1
 * cancelled. */

int cfqt_request_respond(cfqt_request* request, int status, const char* const* headers,
                         size_t header_count);
/* The response head; `headers` holds header_count (name, value) pairs: name0, value0, ... */

int cfqt_request_respond_body(cfqt_request* request, int status, const char* const* headers,
                              size_t header_count, const void* body, size_t size);
/* Head, whole body and end in one call (one hand-off to the tunnel for a small body). */

int cfqt_request_accept_websocket(cfqt_request* request);
/* Answers a WebSocket upgrade: 101 with the Sec-WebSocket-Accept for its key. */

int cfqt_request_write(cfqt_request* request, const void* data, size_t size);
/* Response body bytes; blocks while 64 KiB still wait to go out (back-pressure). */

int cfqt_request_end(cfqt_request* request);
/* The response body is complete. */

void cfqt_request_fail(cfqt_request* request, const char* message);
/* The handler failed: 502 before the head, a reset stream after. `message` is logged only. */

int cfqt_request_cancelled(const cfqt_request* request);

void cfqt_request_free(cfqt_request* request);
/* Releases the request: unanswered → 502, answered → the body ends. */

#ifdef __cplusplus
}
#endif

#endif /* CFQT_CFQT_H_ */
