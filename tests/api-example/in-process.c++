// A complete C++ program that serves HTTP requests in-process through a quick tunnel: no origin
// server, no port. Built in this tree as bin/cfqt-handler-example (cfqt::cfqt); outside it,
// `c++ -std=c++17 in-process.c++ $(pkg-config --cflags --libs cfqt)`. tunnel-handler-test runs it.

#include <cfqt/tunnel.h>

#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>

int main() {
  cfqt::TunnelOptions options;
  options.handler = [](std::shared_ptr<cfqt::Request> request) {
    // On one of the tunnel's handler threads: blocking is fine here.
    if (request->method() == "POST") {
      size_t total = 0;
      char buffer[65536];
      while (size_t n = request->read(buffer, sizeof(buffer))) total += n;
      request->respond(200, {{"Content-Type", "text/plain"}},
                       "received " + std::to_string(total) + " bytes\n");
      return;
    }
    request->respond(200, {{"Content-Type", "text/plain"}},
                     "Hello from C++, served in-process by cfqt: " + request->path() + "\n");
  };
  // Tests point these at the offline edge emulator (cfqt-edge); unset: trycloudflare.com.
  if (const char* v = getenv("CFQT_QUICK_SERVICE")) options.quickService = v;
  if (const char* v = getenv("CFQT_EDGE")) options.edges = {v};
  if (const char* v = getenv("CFQT_EDGE_CA")) options.edgeCaFile = v;

  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);   // before the tunnel's threads start

  auto tunnel = cfqt::Tunnel::start(options);
  std::string url = tunnel->waitForUrl(std::chrono::seconds(30));
  if (url.empty() || !tunnel->waitUntilReady(std::chrono::seconds(30))) return 1;
  printf("%s\n", url.c_str());
  fflush(stdout);
  int signal = 0;
  sigwait(&signals, &signal);                      // Ctrl-C
  return tunnel->stop();                           // graceful: in-flight requests finish
}
