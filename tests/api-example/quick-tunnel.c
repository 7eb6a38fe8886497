/* A small C program that uses only the public C API (include/cfqt/cfqt.h): it exposes an origin
 * through a quick tunnel, prints the URL, and stops gracefully when stdin closes.
 *
 *   quick-tunnel [--quick-service URL] [--edge-ca FILE] [--edge HOST:PORT]... (URL | --hello-world)
 *
 * Built by tests/CMakeLists.txt as bin/cfqt-c-example and driven by the e2e test against
 * cfqt-edge. With no --quick-service/--edge it talks to the real trycloudflare.com. */
#include <cfqt/cfqt.h>

#include <stdio.h>
#include <string.h>

int main(int argc, char** argv) {
  const char* edges[8];
  cfqt_options options;
  cfqt_options_init(&options);
  options.edges = edges;
  options.log_level = "error";
  for (int i = 1; i < argc; i++) {
    const char* a = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : NULL;
    if (strcmp(a, "--hello-world") == 0) {
      options.hello_world = 1;
    } else if (strcmp(a, "--quick-service") == 0 && v) {
      options.quick_service = v;
      i++;
    } else if (strcmp(a, "--edge-ca") == 0 && v) {
      options.edge_ca_file = v;
      i++;
    } else if (strcmp(a, "--edge") == 0 && v && options.edge_count < 8) {
      edges[options.edge_count++] = v;
      i++;
    } else if (a[0] != '-') {
      options.url = a;
    } else {
      fprintf(stderr, "usage: %s [--quick-service URL] [--edge-ca FILE] [--edge HOST:PORT]... "
              "(URL | --hello-world)\n", argv[0]);
      return 2;
    }
  }
  options.ha_connections = options.edge_count == 1 ? 1 : 2;
  options.backoff_base_ms = 50;
  options.grace_period_ms = 2000;

  char error[256] = "";
  cfqt_tunnel* tunnel = cfqt_tunnel_start(&options, error, sizeof error);
  if (tunnel == NULL) {
    fprintf(stderr, "cannot start: %s\n", error);
    return 1;
  }
  char url[256];
  if (cfqt_tunnel_wait_url(tunnel, 30000, url, sizeof url) != 0) {
    fprintf(stderr, "no quick tunnel was issued\n");
    cfqt_tunnel_free(tunnel);
    return 1;
  }
  printf("%s\n", url);
  fflush(stdout);
  if (!cfqt_tunnel_wait_ready(tunnel, 30000)) {
    fprintf(stderr, "no edge connection registered\n");
    cfqt_tunnel_free(tunnel);
    return 1;
  }
  printf("ready %d\n", cfqt_tunnel_ready_connections(tunnel));
  fflush(stdout);

  char line[64];
  while (fgets(line, sizeof line, stdin) != NULL) {}   /* until stdin closes */

  int code = cfqt_tunnel_stop(tunnel);
  printf("stopped %d\n", code);
  cfqt_tunnel_free(tunnel);
  return code;
}
