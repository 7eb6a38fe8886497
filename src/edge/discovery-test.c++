// Edge discovery against real DNS servers: every case runs inside a private network namespace
// (unshare(CLONE_NEWNET), loopback only) with its own dnsmasq instances and, for DNS-over-TLS,
// stunnel terminating TLS (test CA in testdata/, trusted through SSL_CERT_FILE) in front of a
// dnsmasq TCP port. Needs root (CAP_SYS_ADMIN); without it every case is skipped LOUDLY.

#include "discovery.h"

#include "edge/address-pool.h"

#include <kj/debug.h>
#include <kj/test.h>
#include <kj/vector.h>

#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

namespace cfqt::edge {
namespace {

kj::String testdataPath(kj::StringPtr name) {
  const char* root = getenv("CFQT_SOURCE_DIR");
  if (root != nullptr) return kj::str(root, "/src/edge/testdata/", name);
  kj::StringPtr file = __FILE__;
  KJ_IF_MAYBE(slash, file.findLast('/')) {
    return kj::str(file.slice(0, *slash), "/testdata/", name);
  }
  return kj::str("testdata/", name);
}

bool contains(kj::StringPtr haystack, kj::StringPtr needle) {
  return strstr(haystack.cStr(), needle.cStr()) != nullptr;
}

// Enters a fresh network namespace once per process and brings loopback up. False (after a loud
// message) when that is not possible, i.e. not root.
bool enterPrivateNetwork() {
  static int state = 0;   // 0 = not tried, 1 = inside, -1 = impossible
  if (state != 0) return state > 0;
  state = -1;
  const char* why = geteuid() != 0 ? "not running as root"
                  : unshare(CLONE_NEWNET) != 0 ? strerror(errno) : nullptr;
  if (why != nullptr) {
    fprintf(stderr,
        "\n*** SKIPPED: edge discovery tests need root to create a private network namespace "
        "(unshare(CLONE_NEWNET): %s). Run the tests as root. ***\n\n", why);
    return false;
  }
  int fd = socket(AF_INET, SOCK_DGRAM, 0);
  KJ_ASSERT(fd >= 0);
  struct ifreq ifr;
  memset(&ifr, 0, sizeof(ifr));
  strncpy(ifr.ifr_name, "lo", IFNAMSIZ - 1);
  KJ_SYSCALL(ioctl(fd, SIOCGIFFLAGS, &ifr));
  ifr.ifr_flags |= IFF_UP;
  KJ_SYSCALL(ioctl(fd, SIOCSIFFLAGS, &ifr));
  close(fd);
  KJ_ASSERT(setenv("SSL_CERT_FILE", testdataPath("ca.pem").cStr(), 1) == 0);
  state = 1;
  return true;
}

#define SKIP_UNLESS_PRIVATE_NETWORK() if (!enterPrivateNetwork()) return

kj::Maybe<kj::String> findProgram(kj::StringPtr name) {
  for (auto dir: {"/usr/sbin/", "/usr/bin/", "/sbin/", "/bin/", "/usr/local/sbin/",
                  "/usr/local/bin/"}) {
    auto path = kj::str(dir, name);
    if (access(path.cStr(), X_OK) == 0) return kj::mv(path);
  }
  return nullptr;
}

// A server process started for one test: stdout+stderr captured, ready once `marker` was printed,
// SIGTERM + waitpid in the destructor (and SIGKILL if the test process dies).
class Server {
public:
  Server(kj::StringPtr program, kj::Array<kj::String> args, kj::StringPtr marker,
         kj::Maybe<kj::StringPtr> stdinText = nullptr) {
    auto path = KJ_ASSERT_NONNULL(findProgram(program), "not installed (make setup-test)",
                                  program);
    int out[2];
    KJ_SYSCALL(pipe2(out, O_CLOEXEC));
    kj::Vector<char*> argv;
    argv.add(const_cast<char*>(path.cStr()));
    for (auto& a: args) argv.add(const_cast<char*>(a.cStr()));
    argv.add(nullptr);
    pid_t parent = getpid();
    KJ_SYSCALL(pid = fork());
    if (pid == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(1);
      dup2(out[1], 1);
      dup2(out[1], 2);
      execv(path.cStr(), argv.begin());
      _exit(127);
    }
    close(out[1]);
    fd = out[0];
    waitFor(marker, program);
  }

  ~Server() noexcept(false) {
    if (pid > 0) {
      kill(pid, SIGTERM);
      int status;
      while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    }
    if (fd >= 0) close(fd);
  }
  KJ_DISALLOW_COPY(Server);

private:
  pid_t pid = -1;
  int fd = -1;
  kj::Vector<char> output;

  void waitFor(kj::StringPtr marker, kj::StringPtr program) {
    // Bounded: 10 s at most, however slow the machine.
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
      output.add('\0');
      bool found = strstr(output.begin(), marker.cStr()) != nullptr;
      output.removeLast();
      if (found) return;
      struct timespec now;
      clock_gettime(CLOCK_MONOTONIC, &now);
      long elapsedMs = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
      KJ_ASSERT(elapsedMs < 10000, "server did not become ready", program, marker,
                kj::heapString(output.begin(), output.size()));
      struct pollfd p = {fd, POLLIN, 0};
      int n = poll(&p, 1, 10000 - elapsedMs);
      if (n <= 0) continue;
      char buf[4096];
      ssize_t got = read(fd, buf, sizeof(buf));
      KJ_ASSERT(got > 0, "server exited before it was ready", program,
                kj::heapString(output.begin(), output.size()));
      output.addAll(kj::arrayPtr(buf, got));
    }
  }
};

struct SrvSpec {
  kj::StringPtr name;
  kj::StringPtr target;
  uint16_t port;
};

struct HostSpec {
  kj::StringPtr name;
  kj::StringPtr addresses;   // comma separated
};

// dnsmasq answering only from its own records (argotunnel.com is "local": unknown names are
// NXDOMAIN) on 127.0.0.1:<port>, UDP and TCP.
kj::Own<Server> startDnsmasq(uint port, std::initializer_list<SrvSpec> srvs,
                             std::initializer_list<HostSpec> hosts) {
  kj::Vector<kj::String> args;
  for (auto a: {"--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                "--pid-file", "--user=root", "--group=root", "--listen-address=127.0.0.1",
                "--bind-interfaces", "--log-facility=-", "--local=/argotunnel.com/",
                "--local=/test/", "--cache-size=0"}) {
    args.add(kj::str(a));
  }
  args.add(kj::str("--port=", port));
  for (auto& s: srvs) {
    args.add(kj::str("--srv-host=", s.name, ',', s.target, ',', s.port, ",1,1"));
  }
  for (auto& h: hosts) {
    args.add(kj::str("--host-record=", h.name, ',', h.addresses));
  }
  return kj::heap<Server>("dnsmasq", args.releaseAsArray(), "started, version");
}

// stunnel: TLS on 127.0.0.1:<acceptPort> → TCP 127.0.0.1:<connectPort>.
kj::Own<Server> startStunnel(uint acceptPort, uint connectPort, kj::StringPtr cert = "server") {
  auto config = kj::str(
      "foreground = yes\npid =\ndebug = 6\n[dot]\n",
      "accept = 127.0.0.1:", acceptPort, "\nconnect = 127.0.0.1:", connectPort, "\n",
      "cert = ", testdataPath(kj::str(cert, ".pem")), "\n",
      "key = ", testdataPath(kj::str(cert, "-key.pem")), "\n");
  auto path = kj::str("/tmp/cfqt-edge-test-stunnel-", getpid(), '-', acceptPort, ".conf");
  FILE* f = fopen(path.cStr(), "w");
  KJ_ASSERT(f != nullptr);
  fputs(config.cStr(), f);
  fclose(f);
  auto server = kj::heap<Server>(findProgram("stunnel4") == nullptr ? "stunnel" : "stunnel4",
                                 kj::arr(kj::str(path)), "Accepting new connections");
  unlink(path.cStr());
  return server;
}

constexpr kj::StringPtr GLOBAL_SRV = "_v2-origintunneld._tcp.argotunnel.com"_kj;
constexpr kj::StringPtr R1 = "region1.v2.argotunnel.com"_kj;
constexpr kj::StringPtr R2 = "region2.v2.argotunnel.com"_kj;

DiscoveryConfig testConfig(uint dnsPort, uint dotPort = 1) {
  DiscoveryConfig config;
  config.dnsServer = kj::str("127.0.0.1:", dnsPort);
  config.dotServer = kj::str("127.0.0.1:", dotPort, "#dot.test");
  config.dnsTimeout = 300 * kj::MILLISECONDS;
  config.dotTimeout = 2 * kj::SECONDS;
  config.useHostsFile = false;
  return config;
}

EdgeAddresses discover(kj::AsyncIoContext& io, DiscoveryConfig config) {
  return discoverEdges(io.unixEventPort, io.provider->getTimer(), io.provider->getNetwork(),
                       kj::mv(config)).wait(io.waitScope);
}

kj::Exception discoverFails(kj::AsyncIoContext& io, DiscoveryConfig config) {
  auto promise = discoverEdges(io.unixEventPort, io.provider->getTimer(),
                               io.provider->getNetwork(), kj::mv(config));
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { promise.wait(io.waitScope); })) {
    return kj::mv(*e);
  }
  KJ_FAIL_ASSERT("discovery unexpectedly succeeded");
}

const EdgeRegion& regionNamed(const EdgeAddresses& edges, kj::StringPtr name) {
  for (auto& r: edges.regions) {
    if (r.name == name) return r;
  }
  KJ_FAIL_ASSERT("region missing", name);
}

kj::String texts(kj::ArrayPtr<const EdgeAddress> addresses) {
  return kj::strArray(KJ_MAP(a, addresses) { return a.toString(); }, ",");
}

// ---------------------------------------------------------------------------------------------

KJ_TEST("discovery: SRV with two regions and v4/v6 targets, --edge-ip-version auto/4/6") {
  SKIP_UNLESS_PRIVATE_NETWORK();
  auto dns = startDnsmasq(5301,
      {{GLOBAL_SRV, R1, 7844}, {GLOBAL_SRV, R2, 7844}},
      {{R1, "198.41.192.7,2606:4700:a0::7"}, {R2, "198.41.200.7"}});
  auto io = kj::setupAsyncIo();

  auto edges = discover(io, testConfig(5301));
  KJ_EXPECT(!edges.fromEdgeFlag);
  KJ_EXPECT(!edges.usedDotFallback);
  KJ_ASSERT(edges.regions.size() == 2);
  auto& r1 = regionNamed(edges, R1);
  auto& r2 = regionNamed(edges, R2);
  KJ_EXPECT(r1.addresses.size() == 2, texts(r1.addresses));
  // auto: the family of the region's first address is primary, the other one secondary.
  KJ_ASSERT(r1.primary.size() == 1 && r1.secondary.size() == 1, texts(r1.addresses));
  KJ_EXPECT(r1.primary[0].family == r1.addresses[0].family);
  KJ_EXPECT(r1.primary[0].family != r1.secondary[0].family);
  KJ_EXPECT(texts(r2.primary) == "198.41.200.7:7844", texts(r2.primary));
  KJ_EXPECT(r2.secondary.size() == 0);
  KJ_EXPECT(edges.totalPrimary() == 2);

  auto v4Config = testConfig(5301);
  v4Config.ipVersion = IpVersion::V4;
  auto v4 = discover(io, kj::mv(v4Config));
  KJ_EXPECT(texts(regionNamed(v4, R1).primary) == "198.41.192.7:7844");
  KJ_EXPECT(regionNamed(v4, R1).secondary.size() == 0);
  KJ_EXPECT(texts(regionNamed(v4, R2).primary) == "198.41.200.7:7844");

  auto v6Config = testConfig(5301);
  v6Config.ipVersion = IpVersion::V6;
  auto v6 = discover(io, kj::mv(v6Config));
  KJ_EXPECT(texts(regionNamed(v6, R1).primary) == "[2606:4700:a0::7]:7844",
            texts(regionNamed(v6, R1).primary));
  KJ_EXPECT(regionNamed(v6, R2).primary.size() == 0);
  KJ_EXPECT(v6.totalPrimary() == 1);

  // The AddressPool spreads HA indices over both regions and reports the limit.
  AddressPool pool(kj::mv(edges));
  KJ_EXPECT(pool.limitConnections(4) == 2);
  auto now = io.provider->getTimer().now();
  auto a0 = KJ_ASSERT_NONNULL(pool.addressFor(0, now));
  auto a1 = KJ_ASSERT_NONNULL(pool.addressFor(1, now));
  KJ_EXPECT(a0 != a1);
  KJ_EXPECT(pool.regionOf(0) != pool.regionOf(1));
}

KJ_TEST("discovery: auto picks IPv6 as primary when the resolver returns it first") {
  SKIP_UNLESS_PRIVATE_NETWORK();
  auto dns = startDnsmasq(5311,
      {{GLOBAL_SRV, R1, 7844}, {GLOBAL_SRV, R2, 7845}},
      {{R1, "2606:4700:a0::7"}, {R2, "2606:4700:a8::7,198.41.200.7"}});
  auto io = kj::setupAsyncIo();
  auto edges = discover(io, testConfig(5311));
  auto& r1 = regionNamed(edges, R1);
  KJ_EXPECT(texts(r1.primary) == "[2606:4700:a0::7]:7844", texts(r1.primary));
  KJ_EXPECT(r1.secondary.size() == 0);
  auto& r2 = regionNamed(edges, R2);
  KJ_EXPECT(r2.primary[0].family == r2.addresses[0].family);
  KJ_EXPECT(r2.primary[0].port == 7845);   // the port comes from each SRV record

  auto v4Config = testConfig(5311);
  v4Config.ipVersion = IpVersion::V4;
  auto v4 = discover(io, kj::mv(v4Config));
  KJ_EXPECT(regionNamed(v4, R1).primary.size() == 0);
  KJ_EXPECT(texts(regionNamed(v4, R2).primary) == "198.41.200.7:7845");
}

KJ_TEST("discovery: --edge-ip-version with no address of that family is a clear error") {
  SKIP_UNLESS_PRIVATE_NETWORK();
  auto dns = startDnsmasq(5321,
      {{GLOBAL_SRV, R1, 7844}, {GLOBAL_SRV, R2, 7844}},
      {{R1, "198.41.192.7"}, {R2, "198.41.200.7"}});
  auto io = kj::setupAsyncIo();
  auto config = testConfig(5321);
  config.ipVersion = IpVersion::V6;
  auto e = discoverFails(io, kj::mv(config));
  KJ_EXPECT(contains(e.getDescription(), "no IPv6 addresses for the edge regions"),
            e.getDescription());
}

KJ_TEST("discovery: --region selects _<region>-v2-origintunneld") {
  SKIP_UNLESS_PRIVATE_NETWORK();
  auto dns = startDnsmasq(5331,
      {{GLOBAL_SRV, R1, 7844}, {GLOBAL_SRV, R2, 7844},
       {"_us-v2-origintunneld._tcp.argotunnel.com", "us-region1.v2.argotunnel.com", 7844},
       {"_us-v2-origintunneld._tcp.argotunnel.com", "us-region2.v2.argotunnel.com", 7844}},
      {{R1, "198.41.192.7"}, {R2, "198.41.200.7"},
       {"us-region1.v2.argotunnel.com", "198.41.218.1"},
       {"us-region2.v2.argotunnel.com", "198.41.219.1"}});
  auto io = kj::setupAsyncIo();
  auto config = testConfig(5331);
  config.region = kj::str("us");
  auto edges = discover(io, kj::mv(config));
  KJ_EXPECT(texts(regionNamed(edges, "us-region1.v2.argotunnel.com").primary) ==
            "198.41.218.1:7844");
  KJ_EXPECT(texts(regionNamed(edges, "us-region2.v2.argotunnel.com").primary) ==
            "198.41.219.1:7844");
}

KJ_TEST("discovery: SRV failing on plain DNS falls back to DNS-over-TLS; targets via plain DNS") {
  SKIP_UNLESS_PRIVATE_NETWORK();
  // Plain DNS: the targets resolve, the SRV name is NXDOMAIN.
  auto plain = startDnsmasq(5341, {},
      {{R1, "198.41.192.7,2606:4700:a0::7"}, {R2, "198.41.200.7"}});
  // DoT: SRV only (no A/AAAA), so targets resolved over DoT would fail the test.
  auto dotDns = startDnsmasq(5342, {{GLOBAL_SRV, R1, 7844}, {GLOBAL_SRV, R2, 7844}}, {});
  auto tls = startStunnel(8541, 5342);
  auto io = kj::setupAsyncIo();
  auto edges = discover(io, testConfig(5341, 8541));
  KJ_EXPECT(edges.usedDotFallback);
  KJ_ASSERT(edges.warnings.size() >= 1);
  KJ_EXPECT(contains(edges.warnings[0], "NXDOMAIN"), edges.warnings[0]);
  KJ_EXPECT(regionNamed(edges, R1).addresses.size() == 2);
  KJ_EXPECT(texts(regionNamed(edges, R2).primary) == "198.41.200.7:7844");
}

KJ_TEST("discovery: plain SRV with no answer (NODATA) also falls back to DNS-over-TLS") {
  SKIP_UNLESS_PRIVATE_NETWORK();
  // The SRV name exists (it has a TXT record) but has no SRV records.
  auto plain = startDnsmasq(5351, {}, {{R1, "198.41.192.7"}, {R2, "198.41.200.7"},
                                       {GLOBAL_SRV, "192.0.2.1"}});
  auto dotDns = startDnsmasq(5352, {{GLOBAL_SRV, R1, 7844}, {GLOBAL_SRV, R2, 7844}}, {});
  auto tls = startStunnel(8551, 5352);
  auto io = kj::setupAsyncIo();
  auto edges = discover(io, testConfig(5351, 8551));
  KJ_EXPECT(edges.usedDotFallback);
  KJ_EXPECT(edges.totalPrimary() == 2);
}

KJ_TEST("discovery: both plain DNS and DNS-over-TLS failing is a clear error") {
  SKIP_UNLESS_PRIVATE_NETWORK();
  auto plain = startDnsmasq(5361, {}, {{R1, "198.41.192.7"}, {R2, "198.41.200.7"}});
  auto dotDns = startDnsmasq(5362, {}, {});
  auto tls = startStunnel(8561, 5362);
  auto io = kj::setupAsyncIo();
  {
    auto e = discoverFails(io, testConfig(5361, 8561));
    auto d = e.getDescription();
    KJ_EXPECT(contains(d, "edge discovery failed: could not look up "
                          "_v2-origintunneld._tcp.argotunnel.com SRV"), d);
    KJ_EXPECT(contains(d, "Plain DNS: DNS SRV lookup of _v2-origintunneld._tcp.argotunnel.com "
                          "failed: domain name not found (NXDOMAIN)"), d);
    KJ_EXPECT(contains(d, "DNS-over-TLS SRV lookup of _v2-origintunneld._tcp.argotunnel.com via "
                          "127.0.0.1:8561 (dot.test) failed: domain name not found"), d);
    KJ_EXPECT(contains(d, "--edge host:port"), d);
  }
  {
    // Nothing listens on the DoT port.
    auto e = discoverFails(io, testConfig(5361, 8569));
    KJ_EXPECT(contains(e.getDescription(), "via 127.0.0.1:8569 (dot.test) failed: cannot connect"),
              e.getDescription());
  }
}

KJ_TEST("discovery: DNS-over-TLS certificate failure is reported") {
  SKIP_UNLESS_PRIVATE_NETWORK();
  auto plain = startDnsmasq(5371, {}, {});
  auto dotDns = startDnsmasq(5372, {{GLOBAL_SRV, R1, 7844}, {GLOBAL_SRV, R2, 7844}}, {});
  auto tls = startStunnel(8571, 5372, "untrusted");
  auto io = kj::setupAsyncIo();
  auto e = discoverFails(io, testConfig(5371, 8571));
  KJ_EXPECT(contains(e.getDescription(), "TLS handshake failed"), e.getDescription());
  KJ_EXPECT(contains(e.getDescription(), "self-signed certificate"), e.getDescription());
}

KJ_TEST("discovery: fewer than two SRV records gives cloudflared's error") {
  SKIP_UNLESS_PRIVATE_NETWORK();
  auto dns = startDnsmasq(5381, {{GLOBAL_SRV, R1, 7844}}, {{R1, "198.41.192.7"}});
  auto io = kj::setupAsyncIo();
  auto e = discoverFails(io, testConfig(5381));
  KJ_EXPECT(e.getDescription() ==
            "expected at least 2 Cloudflare Regions regions, but SRV only returned 1",
            e.getDescription());
}

KJ_TEST("discovery: an unresolvable SRV target is a clear error") {
  SKIP_UNLESS_PRIVATE_NETWORK();
  auto dns = startDnsmasq(5391, {{GLOBAL_SRV, R1, 7844}, {GLOBAL_SRV, R2, 7844}},
                          {{R1, "198.41.192.7"}});
  auto io = kj::setupAsyncIo();
  auto e = discoverFails(io, testConfig(5391));
  KJ_EXPECT(contains(e.getDescription(),
                     "cannot resolve the edge region region2.v2.argotunnel.com"),
            e.getDescription());
}

KJ_TEST("discovery: DNS timeouts are bounded by the configured timeouts") {
  SKIP_UNLESS_PRIVATE_NETWORK();
  auto io = kj::setupAsyncIo();
  // A UDP "server" that never answers and a TCP "DoT server" that accepts but never speaks.
  auto network = &io.provider->getNetwork();
  auto udp = network->parseAddress("127.0.0.1", 5401).wait(io.waitScope)->bindDatagramPort();
  auto tcp = network->parseAddress("127.0.0.1", 8601).wait(io.waitScope)->listen();
  auto accepted = tcp->accept();
  auto config = testConfig(5401, 8601);
  config.dnsTimeout = 100 * kj::MILLISECONDS;
  config.dotTimeout = 300 * kj::MILLISECONDS;
  auto start = io.provider->getTimer().now();
  auto e = discoverFails(io, kj::mv(config));
  auto elapsed = io.provider->getTimer().now() - start;
  KJ_EXPECT(contains(e.getDescription(), "timed out"), e.getDescription());
  KJ_EXPECT(contains(e.getDescription(), "timed out after 300 ms"), e.getDescription());
  KJ_EXPECT(elapsed < 5 * kj::SECONDS, elapsed);
}

KJ_TEST("discovery: --edge skips discovery, keeps repeats, alternates regions") {
  SKIP_UNLESS_PRIVATE_NETWORK();
  auto dns = startDnsmasq(5411, {}, {{"edge.test", "192.0.2.10,2001:db8::10"}});
  auto io = kj::setupAsyncIo();
  auto config = testConfig(5411);
  for (auto e: {"127.0.0.1:7844", "[::1]:7845", "127.0.0.1:7844", "edge.test:7846",
                "missing.test:7847", "no-port", "[::1]:0"}) {
    config.edges.add(kj::str(e));
  }
  auto edges = discover(io, kj::mv(config));
  KJ_EXPECT(edges.fromEdgeFlag);
  KJ_ASSERT(edges.regions.size() == 2);
  KJ_EXPECT(texts(edges.regions[0].addresses) == "127.0.0.1:7844,127.0.0.1:7844",
            texts(edges.regions[0].addresses));
  KJ_EXPECT(edges.regions[1].addresses.size() == 2);
  KJ_EXPECT(edges.regions[1].addresses[0].toString() == "[::1]:7845");
  auto& named = edges.regions[1].addresses[1];
  KJ_EXPECT(named.port == 7846);
  KJ_EXPECT(named.ipString() == "192.0.2.10" || named.ipString() == "2001:db8::10",
            named.toString());
  KJ_EXPECT(edges.warnings.size() == 3, kj::strArray(edges.warnings, " | "));

  auto none = testConfig(5411);
  none.edges.add(kj::str("missing.test:1"));
  auto e = discoverFails(io, kj::mv(none));
  KJ_EXPECT(contains(e.getDescription(), "none of the --edge addresses could be resolved"),
            e.getDescription());
}

KJ_TEST("DnsResolver: a truncated UDP answer is retried over TCP on the KJ loop") {
  SKIP_UNLESS_PRIVATE_NETWORK();
  // 40 SRV records do not fit a 512-byte UDP answer: dnsmasq sets TC and c-ares reconnects over
  // TCP, which exercises the writable/connect path of the FdObserver integration.
  kj::Vector<kj::String> args;
  for (auto a: {"--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                "--pid-file", "--user=root", "--group=root", "--listen-address=127.0.0.1",
                "--bind-interfaces", "--log-facility=-", "--local=/argotunnel.com/",
                "--port=5421"}) {
    args.add(kj::str(a));
  }
  for (uint i = 0; i < 40; i++) {
    args.add(kj::str("--srv-host=", GLOBAL_SRV, ",edge-region-number-", i,
                     ".v2.argotunnel.com,", 7000 + i, ",1,1"));
  }
  Server dns("dnsmasq", args.releaseAsArray(), "started, version");
  auto io = kj::setupAsyncIo();
  DnsResolverOptions options;
  options.server = kj::str("127.0.0.1:5421");
  options.queryTimeout = 500 * kj::MILLISECONDS;
  DnsResolver resolver(io.unixEventPort, io.provider->getTimer(), kj::mv(options));
  // Also: the loop keeps running other work while the query is in flight.
  bool timerFired = false;
  auto tick = io.provider->getTimer().afterDelay(0 * kj::MILLISECONDS)
      .then([&timerFired]() { timerFired = true; });
  auto records = resolver.querySrv(GLOBAL_SRV).wait(io.waitScope);
  tick.wait(io.waitScope);
  KJ_EXPECT(timerFired);
  KJ_ASSERT(records.size() == 40, records.size());
  uint portSum = 0;
  for (auto& r: records) {
    KJ_EXPECT(r.target.startsWith("edge-region-number-"), r.target);
    KJ_EXPECT(!r.target.endsWith("."));
    portSum += r.port;
  }
  KJ_EXPECT(portSum == 40 * 7000 + 39 * 40 / 2);
}

KJ_TEST("DnsResolver: A and AAAA of one name, IP literals, NXDOMAIN") {
  SKIP_UNLESS_PRIVATE_NETWORK();
  auto dns = startDnsmasq(5431, {}, {{"both.test", "192.0.2.1,2001:db8::1"}});
  auto io = kj::setupAsyncIo();
  DnsResolverOptions options;
  options.server = kj::str("127.0.0.1:5431");
  options.queryTimeout = 300 * kj::MILLISECONDS;
  options.useHostsFile = false;
  DnsResolver resolver(io.unixEventPort, io.provider->getTimer(), kj::mv(options));
  auto both = resolver.resolveHost("both.test", 7844).wait(io.waitScope);
  KJ_EXPECT(both.size() == 2, texts(both));
  bool v4 = false, v6 = false;
  for (auto& a: both) {
    if (a.toString() == "192.0.2.1:7844") v4 = true;
    if (a.toString() == "[2001:db8::1]:7844") v6 = true;
  }
  KJ_EXPECT(v4 && v6, texts(both));
  auto literal = resolver.resolveHost("2001:db8::5", 1).wait(io.waitScope);
  KJ_EXPECT(texts(literal) == "[2001:db8::5]:1");
  auto missing = resolver.resolveHost("missing.test", 1);
  KJ_EXPECT_THROW_MESSAGE("DNS lookup of missing.test failed: domain name not found",
                          missing.wait(io.waitScope));
  // Several lookups at once share the channel.
  auto p1 = resolver.resolveHost("both.test", 1);
  auto p2 = resolver.querySrv("_nothing._tcp.test");
  auto p3 = resolver.resolveHost("both.test", 2);
  KJ_EXPECT(p1.wait(io.waitScope).size() == 2);
  KJ_EXPECT_THROW_MESSAGE("NXDOMAIN", p2.wait(io.waitScope));
  KJ_EXPECT(p3.wait(io.waitScope)[0].port == 2);
}

KJ_TEST("discovery: malformed --dns-server / --dot-server are config errors") {
  auto io = kj::setupAsyncIo();
  auto bad = testConfig(53);
  bad.dnsServer = kj::str("localhost");
  KJ_EXPECT(contains(discoverFails(io, kj::mv(bad)).getDescription(), "invalid --dns-server"));
  auto bad2 = testConfig(53);
  bad2.dotServer = kj::str("1.1.1.1");
  KJ_EXPECT(contains(discoverFails(io, kj::mv(bad2)).getDescription(), "invalid --dot-server"));
}

}  // namespace
}  // namespace cfqt::edge
