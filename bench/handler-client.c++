// cfqt-handler-bench: a quick-tunnel client that serves a directory through the in-process
// handler (include/cfqt/handler.h) instead of proxying to an origin, for `bench/e2e --handler`.
// It takes the cloudflared flags bench/e2e gives every client (--url is ignored: the files come
// from --www) and prints the public URL as the first stdout line. Runs until SIGINT/SIGTERM.

#include "cfqt/tunnel.h"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <condition_variable>
#include <functional>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

class Workers {
  // Large files are streamed by these threads (blocking writes); small ones are answered inline
  // on the tunnel's event loop (TunnelOptions::handlerThreads = 0).
public:
  explicit Workers(size_t n) {
    for (size_t i = 0; i < n; i++) threads.emplace_back([this]() { work(); });
  }
  ~Workers() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      stopping = true;
    }
    wake.notify_all();
    for (auto& t: threads) t.join();
  }
  void add(std::function<void()> job) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      jobs.push_back(std::move(job));
    }
    wake.notify_one();
  }

private:
  std::mutex mutex;
  std::condition_variable wake;
  std::deque<std::function<void()>> jobs;
  bool stopping = false;
  std::vector<std::thread> threads;

  void work() {
    while (true) {
      std::function<void()> job;
      {
        std::unique_lock<std::mutex> lock(mutex);
        wake.wait(lock, [this]() { return stopping || !jobs.empty(); });
        if (jobs.empty()) return;
        job = std::move(jobs.front());
        jobs.pop_front();
      }
      job();
    }
  }
};

void streamFile(std::shared_ptr<cfqt::Request> request, const cfqt::Headers& headers, int fd,
                off_t size);

void serveFile(const std::string& root, const std::shared_ptr<cfqt::Request>& request,
               Workers& workers) {
  auto path = request->path().substr(0, request->path().find('?'));
  if (path.find("..") != std::string::npos || path.empty() || path[0] != '/') {
    request->respond(400, {{"Content-Type", "text/plain"}}, "bad path\n");
    return;
  }
  int fd = open((root + path).c_str(), O_RDONLY | O_CLOEXEC);
  struct stat st;
  if (fd < 0 || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    if (fd >= 0) close(fd);
    request->respond(404, {{"Content-Type", "text/plain"}}, "not found\n");
    return;
  }
  cfqt::Headers headers = {{"Content-Type", "application/octet-stream"},
                           {"Content-Length", std::to_string(st.st_size)}};
  if (st.st_size <= 64 * 1024) {
    std::string body(st.st_size, '\0');
    ssize_t n = pread(fd, &body[0], body.size(), 0);
    close(fd);
    if (n != ssize_t(body.size())) {
      request->fail("short read");
      return;
    }
    try {
      request->respond(200, headers, body);   // one hand-off for head, body and end
    } catch (const cfqt::RequestCancelled&) {
      // the visitor left
    }
    return;
  }
  workers.add([request, headers, fd, size = st.st_size]() {
    streamFile(request, headers, fd, size);
  });
}

void streamFile(std::shared_ptr<cfqt::Request> request, const cfqt::Headers& headers, int fd,
                off_t size) {
  std::vector<char> buffer(256 * 1024);
  off_t offset = 0;
  try {
    request->respond(200, headers);
    while (offset < size) {
      ssize_t n = pread(fd, buffer.data(), buffer.size(), offset);
      if (n <= 0) break;
      request->write(buffer.data(), n);
      offset += n;
    }
    request->end();
  } catch (const cfqt::RequestCancelled&) {
    // the visitor left
  }
  close(fd);
}

int usage(const char* why) {
  fprintf(stderr, "cfqt-handler-bench: %s\nusage: cfqt-handler-bench --www DIR --quick-service URL "
          "--edge HOST:PORT... --cacert FILE [--metrics ADDR] [--ha-connections N] "
          "[--loglevel L] [--protocol P] [--url IGNORED]\n", why);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  cfqt::TunnelOptions o;
  std::string www;
  for (int i = 1; i < argc; i++) {
    std::string flag = argv[i];
    if (flag == "--version") {
      puts("cfqt-handler-bench (cfqt in-process handler)");
      return 0;
    }
    if (i + 1 >= argc) return usage(("missing value of " + flag).c_str());
    std::string value = argv[++i];
    if (flag == "--www") {
      www = value;
    } else if (flag == "--quick-service") {
      o.quickService = value;
    } else if (flag == "--edge") {
      o.edges.push_back(value);
    } else if (flag == "--cacert" || flag == "--edge-ca") {
      o.edgeCaFile = value;
    } else if (flag == "--metrics") {
      o.metrics = true;
      o.metricsAddress = value;
    } else if (flag == "--ha-connections") {
      o.haConnections = atoi(value.c_str());
    } else if (flag == "--loglevel") {
      o.logLevel = value;
    } else if (flag == "--protocol") {
      o.protocol = value;
    } else if (flag != "--url") {
      return usage(("unknown flag " + flag).c_str());
    }
  }
  if (www.empty()) return usage("--www is required");
  Workers workers(8);
  o.handlerThreads = 0;
  o.handler = [www, &workers](std::shared_ptr<cfqt::Request> request) {
    serveFile(www, request, workers);
  };

  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);   // before any thread: only sigwait() gets them

  std::unique_ptr<cfqt::Tunnel> tunnel;
  try {
    tunnel = cfqt::Tunnel::start(o);
  } catch (const cfqt::TunnelError& e) {
    return usage(e.what());
  }
  auto url = tunnel->waitForUrl(std::chrono::seconds(60));
  if (url.empty()) {
    fprintf(stderr, "cfqt-handler-bench: no quick tunnel was issued\n");
    return 1;
  }
  printf("%s\n", url.c_str());
  fflush(stdout);
  int signal = 0;
  sigwait(&signals, &signal);
  return tunnel->stop();
}
