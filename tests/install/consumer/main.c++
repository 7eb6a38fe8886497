// Uses the installed C++ API across the shared-library boundary: an error thrown inside
// libcfqt.so is caught here by type, and a tunnel thread is started and stopped.
//
//   consumer QUICK_SERVICE_URL   (a service that refuses connections, so no tunnel is issued)
#include <cfqt/tunnel.h>

#include <cstdio>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s QUICK_SERVICE_URL\n", argv[0]);
    return 2;
  }
  cfqt::TunnelOptions options;
  options.helloWorld = true;
  options.haConnections = 9;
  try {
    cfqt::Tunnel::start(options);
    std::printf("FAIL: haConnections = 9 was accepted\n");
    return 1;
  } catch (const cfqt::TunnelError& e) {
    std::printf("caught: %s\n", e.what());
  }

  options.haConnections = 1;
  options.quickService = argv[1];
  options.logLevel = "fatal";
  auto tunnel = cfqt::Tunnel::start(options);
  std::string url = tunnel->waitForUrl(std::chrono::milliseconds(50));
  int status = tunnel->stop();
  std::printf("url \"%s\" stop %d running %d\n", url.c_str(), status, tunnel->running() ? 1 : 0);
  return url.empty() && !tunnel->running() ? 0 : 1;
}
