#include "emulator.h"

#include "admin-server.h"
#include "api-server.h"
#include "h2-edge.h"
#include "json.h"

#if CFQT_EMULATOR_QUIC
#include "edge-server.h"
#include "observe/log.h"
#endif

#include <kj/compat/tls.h>
#include <kj/debug.h>
#include <kj/io.h>

#include <fcntl.h>

namespace cfqt::emulator {

namespace {

class LoggingErrorHandler final: public kj::TaskSet::ErrorHandler {
public:
  void taskFailed(kj::Exception&& exception) override {
    if (exception.getType() == kj::Exception::Type::DISCONNECTED) {
      observe::logDebug("emulator task ended", observe::Fields().error(exception));
    } else {
      observe::logError("emulator task failed", observe::Fields().error(exception));
    }
  }
};

kj::String withPort(kj::StringPtr address, kj::uint port) {
  KJ_IF_MAYBE(colon, address.findLast(':')) {
    return kj::str(address.slice(0, *colon), ':', port);
  }
  return kj::str(address, ':', port);
}

constexpr kj::uint MAX_PORT_ATTEMPTS = 20;
// Ephemeral edge ports tried until one is free on both TCP and UDP.

struct Listener {
  kj::Own<kj::ConnectionReceiver> receiver;
  kj::String bound;
};

}  // namespace

quic::TransportConfig EmulatorOptions::defaultEdgeTransport() {
  quic::TransportConfig config;
  config.keepAlivePeriod = 0 * kj::SECONDS;
  config.maxIdleTimeout = 5 * kj::SECONDS;
  // Receive side as on a production edge, which serves many large downloads per tunnel
  // connection: each visitor is bounded by its own stream window (512 KiB, auto-tuned up to
  // 6 MiB only while that visitor keeps up), and connection credit is returned as soon as bytes
  // are buffered, so visitors that stop reading never hold the connection window the other
  // streams need (issue 13).
  config.initialStreamWindow = 512 * 1024;
  config.maxStreamWindow = 6 * 1024 * 1024;
  config.recvCreditBudget = 1024 * 1024 * 1024;
  // quic-go (the edge's stack) acknowledges a lone ack-eliciting packet after max_ack_delay
  // (25 ms) unless it has data to send first; every second one at once.
  config.ackDelay = 25 * kj::MILLISECONDS;
  return config;
}

namespace {
kj::String optionalJson(const kj::Maybe<kj::String>& value) {
  KJ_IF_MAYBE(v, value) return jsonString(*v);
  return kj::str("null");
}
}  // namespace

kj::String ReadyInfo::toJson() const {
  kj::Vector<kj::String> edgeItems;
  for (auto& e: edges) edgeItems.add(jsonString(e));
  kj::Vector<kj::String> tcpItems;
  for (auto& e: tcpEdges) tcpItems.add(jsonString(e));
  return kj::str(
      "{\"api\":", jsonString(api),
      ",\"edge\":", jsonString(edges.empty() ? kj::StringPtr("") : edges[0].asPtr()),
      ",\"edges\":[", kj::strArray(edgeItems, ","), "]",
      ",\"public\":", jsonString(publicAddress),
      ",\"admin\":", jsonString(admin),
      ",\"ca\":", jsonString(ca),
      ",\"zone\":", jsonString(zone),
      ",\"tcpEdges\":[", kj::strArray(tcpItems, ","), "]",
      ",\"udpBlocked\":", udpBlocked ? "true" : "false",
      ",\"dns\":", optionalJson(dns), ",\"dot\":", optionalJson(dot),
      ",\"public_tls\":", optionalJson(publicTls),
      [&]() {
        KJ_IF_MAYBE(t, apiTls) return kj::str(",\"apiTls\":", jsonString(*t));
        return kj::str();
      }(), '}');
}

kj::Maybe<kj::Duration> parseDuration(kj::StringPtr text) {
  size_t digits = 0;
  uint64_t value = 0;
  while (digits < text.size() && text[digits] >= '0' && text[digits] <= '9') {
    if (digits >= 12) return nullptr;
    value = value * 10 + static_cast<uint64_t>(text[digits] - '0');
    digits++;
  }
  if (digits == 0) return nullptr;
  auto unit = text.slice(digits);
  int64_t v = static_cast<int64_t>(value);
  if (unit == "ms") return v * kj::MILLISECONDS;
  if (unit == "s") return v * kj::SECONDS;
  if (unit == "m") return v * kj::MINUTES;
  if (unit == "h") return v * kj::HOURS;
  if (unit == "us") return v * kj::MICROSECONDS;
  if (unit == "" && value == 0) return 0 * kj::SECONDS;
  return nullptr;
}

class Emulator::Impl final: public UdpSwitch {
public:
  Impl(kj::AsyncIoContext& io, EmulatorOptions optionsParam)
      : io(io), options(kj::mv(optionsParam)),
        registry(options.zone, options.location),
        apiService(registry, headerTable),
        adminService(registry, headerTable, kj::Maybe<UdpSwitch&>(*this)),
        frontDoor(io.provider->getTimer(), headerTable, registry, options.frontDoor),
        apiServer(io.provider->getTimer(), headerTable, apiService, httpSettings()),
        adminServer(io.provider->getTimer(), headerTable, adminService, httpSettings()),
        tasks(errorHandler) {
    registry.setClock(kj::systemPreciseMonotonicClock());
    // As Cloudflare's edge does: a connector joining a remotely managed tunnel gets the
    // tunnel's current configuration pushed once it registered.
    registry.onRegistered([this](ConnectionRecord& record) {
      if (!record.tunnel.remotelyManaged) return;
      KJ_IF_MAYBE(json, record.tunnel.remoteConfig) {
        auto id = record.id;
        auto version = record.tunnel.remoteVersion;
        tasks.add(kj::evalLater([this, id, version, config = kj::str(*json)]() mutable
                                    -> kj::Promise<void> {
          KJ_IF_MAYBE(r, registry.findConnection(id)) {
            KJ_IF_MAYBE(connection, r->connection) {
              return connection->pushConfiguration(version, kj::mv(config))
                  .then([](kj::String) {}, [](kj::Exception&&) {});
            }
          }
          return kj::READY_NOW;
        }));
      }
    });
  }

  kj::Promise<ReadyInfo> start() {
    if (options.certificates.stateDir.size() == 0) {
      options.certificates.stateDir = kj::str("cfqt-edge-state");
    }
    auto certificates = ensureCertificates(options.certificates);
    serverCertFile = kj::heapString(certificates.serverCert);
    serverKeyFile = kj::heapString(certificates.serverKey);
    ready.ca = kj::heapString(certificates.caCert);
    ready.zone = kj::heapString(registry.zone());
    return startEdges(certificates).then([this]() {
      return bind(options.apiListen);
    }).then([this](Listener listener) {
      ready.api = kj::mv(listener.bound);
      tasks.add(acceptHttp(apiServer, *listener.receiver).attach(kj::mv(listener.receiver)));
      return bind(options.publicListen);
    }).then([this](Listener listener) {
      ready.publicAddress = kj::mv(listener.bound);
      tasks.add(frontDoor.listen(*listener.receiver).attach(kj::mv(listener.receiver)));
      return bind(options.adminListen);
    }).then([this](Listener listener) {
      ready.admin = kj::mv(listener.bound);
      tasks.add(acceptHttp(adminServer, *listener.receiver).attach(kj::mv(listener.receiver)));
      return startApiTls();
    }).then([this]() { return startPublicTls(); })
      .then([this]() { return startDns(); })
      .then([this]() { return copyReady(); });
  }

  bool hasQuicEdge() const { return CFQT_EMULATOR_QUIC != 0; }

  bool udpBlocked() override {
#if CFQT_EMULATOR_QUIC
    if (edgeServer.get() != nullptr) return edgeServer->udpBlocked();
#endif
    return options.noUdp;
  }

  void setUdpBlocked(bool blocked) override {
#if CFQT_EMULATOR_QUIC
    if (edgeServer.get() != nullptr) edgeServer->setUdpBlocked(blocked);
#endif
  }

  kj::AsyncIoContext& io;
  EmulatorOptions options;
  kj::HttpHeaderTable headerTable;
  Registry registry;
  ApiService apiService;
  AdminService adminService;
#if CFQT_EMULATOR_QUIC
  kj::Own<EdgeServer> edgeServer;     // declared first: the front door and its streams die first
#endif
  kj::Own<Http2EdgeServer> http2Edge; // likewise
  FrontDoor frontDoor;
  kj::HttpServer apiServer;
  kj::HttpServer adminServer;
  ReadyInfo ready;
  kj::String serverCertFile;
  kj::String serverKeyFile;
  kj::Maybe<kj::Own<kj::TlsKeypair>> tlsKeypair;
  kj::Maybe<kj::Own<kj::TlsContext>> tls;
  kj::Maybe<kj::Own<kj::TlsKeypair>> publicKeypair;
  kj::Maybe<kj::Own<kj::TlsContext>> publicTls;
  kj::Maybe<kj::Own<kj::TlsKeypair>> dotKeypair;
  kj::Maybe<kj::Own<kj::TlsContext>> dotTls;
  kj::Maybe<kj::Own<DnsServer>> dnsServer;
  kj::Vector<kj::Own<kj::DatagramPort>> dnsPorts;
  kj::Vector<kj::Array<kj::byte>> publicIps;   // where the DNS points the tunnels' names
  LoggingErrorHandler errorHandler;
  kj::TaskSet tasks;

private:
  static kj::String readText(kj::StringPtr path) {
    int fd;
    KJ_SYSCALL(fd = open(path.cStr(), O_RDONLY | O_CLOEXEC), path);
    kj::FdInputStream in((kj::AutoCloseFd(fd)));
    auto bytes = in.readAllBytes();
    return kj::heapString(bytes.asChars());
  }

  kj::Promise<void> startApiTls() {
    KJ_IF_MAYBE(address, options.apiTlsListen) {
      auto keypair = kj::heap<kj::TlsKeypair>(kj::TlsKeypair{
          kj::TlsPrivateKey(readText(serverKeyFile)), kj::TlsCertificate(readText(serverCertFile))});
      kj::TlsContext::Options tlsOptions;
      tlsOptions.useSystemTrustStore = false;
      tlsOptions.defaultKeypair = *keypair;
      tls = kj::heap<kj::TlsContext>(kj::mv(tlsOptions));
      tlsKeypair = kj::mv(keypair);
      return bind(*address).then([this](Listener listener) {
        ready.apiTls = kj::mv(listener.bound);
        tasks.add(acceptTls(*listener.receiver).attach(kj::mv(listener.receiver)));
      });
    }
    return kj::READY_NOW;
  }

  static kj::Own<kj::TlsContext> serverTls(kj::StringPtr certFile, kj::StringPtr keyFile,
                                           kj::Maybe<kj::Own<kj::TlsKeypair>>& keypairHolder) {
    auto keypair = kj::heap<kj::TlsKeypair>(kj::TlsKeypair{
        kj::TlsPrivateKey(readText(keyFile)), kj::TlsCertificate(readText(certFile))});
    kj::TlsContext::Options tlsOptions;
    tlsOptions.useSystemTrustStore = false;
    tlsOptions.defaultKeypair = *keypair;
    auto context = kj::heap<kj::TlsContext>(kj::mv(tlsOptions));
    keypairHolder = kj::mv(keypair);
    return context;
  }

  static kj::String hostOf(kj::StringPtr address) {
    // "127.0.0.1:80" → "127.0.0.1", "[::1]:80" → "::1"
    KJ_IF_MAYBE(colon, address.findLast(':')) {
      auto host = kj::str(address.slice(0, *colon));
      if (host.startsWith("[") && host.endsWith("]")) {
        return kj::str(host.slice(1, host.size() - 1));
      }
      return host;
    }
    return kj::str(address);
  }

  void addPublicIp(kj::StringPtr address) {
    auto host = hostOf(address);
    if (host == "0.0.0.0" || host == "*") host = kj::str("127.0.0.1");
    if (host == "::") host = kj::str("::1");
    KJ_IF_MAYBE(bytes, parseIpBytes(host)) publicIps.add(kj::mv(*bytes));
  }

  kj::Promise<void> startPublicTls() {
    KJ_IF_MAYBE(address, options.publicTlsListen) {
      kj::String cert, key;
      KJ_IF_MAYBE(c, options.publicTlsCert) {
        cert = kj::str(*c);
        key = kj::str(KJ_REQUIRE_NONNULL(options.publicTlsKey,
                                         "--public-tls-cert needs --public-tls-key"));
      } else {
        auto files = ensureZoneCertificate(options.certificates, registry.zone());
        cert = kj::mv(files.serverCert);
        key = kj::mv(files.serverKey);
      }
      publicTls = serverTls(cert, key, publicKeypair);
      return bind(*address).then([this](Listener listener) {
        return publicTlsBound(kj::mv(listener));
      });
    }
    return kj::READY_NOW;
  }

  kj::Promise<void> publicTlsBound(Listener listener) {
    addPublicIp(listener.bound);
    auto bound = kj::heapString(listener.bound);
    ready.publicTls = kj::mv(listener.bound);
    tasks.add(acceptPublicTls(*listener.receiver).attach(kj::mv(listener.receiver)));
    auto host = hostOf(bound);
    if (!host.startsWith("127.")) return kj::READY_NOW;
    // A loopback IPv4 front door also listens on ::1 (same port) when it can, so the AAAA record
    // that real resolvers return for a quick tunnel points somewhere that serves.
    auto v6 = kj::str("[::1]:", bound.slice(KJ_ASSERT_NONNULL(bound.findLast(':')) + 1));
    return bind(v6).then([this](Listener listener) {
      addPublicIp(listener.bound);
      tasks.add(acceptPublicTls(*listener.receiver).attach(kj::mv(listener.receiver)));
    }, [](kj::Exception&& e) {
      observe::logDebug("HTTPS front door not served on ::1 (no AAAA record)",
                        observe::Fields().error(e));
    });
  }

  kj::Promise<void> acceptPublicTls(kj::ConnectionReceiver& receiver) {
    return receiver.accept().then([this, &receiver](kj::Own<kj::AsyncIoStream> connection) {
      tasks.add(servePublicTls(kj::mv(connection)));
      return acceptPublicTls(receiver);
    });
  }

  kj::Promise<void> servePublicTls(kj::Own<kj::AsyncIoStream> connection) {
    // Per-connection TLS handshake (bounded like a request head): a failure ends that one only.
    auto& context = *KJ_ASSERT_NONNULL(publicTls);
    auto handshake = context.wrapServer(kj::mv(connection));
    return io.provider->getTimer().timeoutAfter(options.frontDoor.headerTimeout,
                                                kj::mv(handshake))
        .then([this](kj::Own<kj::AsyncIoStream> secured) {
      return frontDoor.serve(kj::mv(secured));
    }).catch_([](kj::Exception&& e) {
      observe::logDebug("HTTPS front door connection ended", observe::Fields().error(e));
    });
  }

  kj::Promise<void> startDns() {
    if (options.dnsListen == nullptr && options.dotListen == nullptr) return kj::READY_NOW;
    DnsServerOptions dnsOptions;
    dnsOptions.dnsDelay = options.dnsDelay;
    dnsOptions.negativeTtl = options.negativeTtl;
    if (publicIps.empty()) addPublicIp(ready.publicAddress);
    for (auto& ip: publicIps) {
      (ip.size() == 4 ? dnsOptions.ipv4 : dnsOptions.ipv6).add(kj::heapArray(ip.asPtr()));
    }
    dnsServer = kj::heap<DnsServer>(io.provider->getTimer(), registry, kj::mv(dnsOptions));
    kj::Promise<void> promise = kj::READY_NOW;
    KJ_IF_MAYBE(address, options.dnsListen) {
      promise = bind(*address).then([this](Listener listener) {
        return dnsTcpBound(kj::mv(listener));
      });
    }
    return promise.then([this]() { return startDot(); });
  }

  kj::Promise<void> dnsTcpBound(Listener listener) {
    // UDP on the port TCP got.
    auto& server = *KJ_ASSERT_NONNULL(dnsServer);
    tasks.add(server.listenTcp(*listener.receiver, nullptr).attach(kj::mv(listener.receiver)));
    ready.dns = kj::heapString(listener.bound);
    return io.provider->getNetwork().parseAddress(listener.bound)
        .then([this](kj::Own<kj::NetworkAddress> parsed) {
      auto port = parsed->bindDatagramPort();
      tasks.add(KJ_ASSERT_NONNULL(dnsServer)->serveUdp(*port));
      dnsPorts.add(kj::mv(port));
    });
  }

  kj::Promise<void> startDot() {
    KJ_IF_MAYBE(address, options.dotListen) {
      dotTls = serverTls(serverCertFile, serverKeyFile, dotKeypair);
      return bind(*address).then([this](Listener listener) {
        ready.dot = kj::mv(listener.bound);
        auto& server = *KJ_ASSERT_NONNULL(dnsServer);
        tasks.add(server.listenTcp(*listener.receiver, *KJ_ASSERT_NONNULL(dotTls))
                      .attach(kj::mv(listener.receiver)));
      });
    }
    return kj::READY_NOW;
  }

  kj::Promise<void> acceptHttp(kj::HttpServer& server, kj::ConnectionReceiver& receiver) {
    // Our own accept loop rather than HttpServer::listenHttp(port), whose per-connection errors
    // (any client sending garbage) would be logged as server bugs.
    return receiver.accept().then(
        [this, &server, &receiver](kj::Own<kj::AsyncIoStream> connection) {
      tasks.add(serveHttp(server, kj::mv(connection)));
      return acceptHttp(server, receiver);
    });
  }

  static kj::Promise<void> serveHttp(kj::HttpServer& server,
                                     kj::Own<kj::AsyncIoStream> connection) {
    return server.listenHttp(kj::mv(connection)).catch_([](kj::Exception&& e) {
      observe::logDebug("HTTP connection ended with an error", observe::Fields().error(e));
    });
  }

  kj::Promise<void> acceptTls(kj::ConnectionReceiver& receiver) {
    // Per-connection TLS handshakes: a failed handshake only ends that connection.
    return receiver.accept().then([this, &receiver](kj::Own<kj::AsyncIoStream> connection) {
      tasks.add(serveTls(kj::mv(connection)));
      return acceptTls(receiver);
    });
  }

  kj::Promise<void> serveTls(kj::Own<kj::AsyncIoStream> connection) {
    auto& context = *KJ_ASSERT_NONNULL(tls);
    return context.wrapServer(kj::mv(connection))
        .then([this](kj::Own<kj::AsyncIoStream> secured) {
      return apiServer.listenHttp(kj::mv(secured));
    }).catch_([](kj::Exception&& e) {
      observe::logDebug("API TLS connection ended", observe::Fields().error(e));
    });
  }

  kj::HttpServerSettings httpSettings() {
    kj::HttpServerSettings settings;
    settings.headerTimeout = options.apiHeaderTimeout;
    return settings;
  }

  kj::Promise<void> startEdges(const CertificateFiles& certificates) {
    if (options.edgeListen.empty()) options.edgeListen.add(kj::str("127.0.0.1:0"));
    Http2EdgeOptions http2Options;
    http2Options.certFile = kj::heapString(certificates.serverCert);
    http2Options.keyFile = kj::heapString(certificates.serverKey);
    http2Options.handshakeTimeout = options.edgeTransport.handshakeTimeout;
    http2Options.session = options.http2;
    http2Options.session.role = Http2Role::CLIENT;
    http2Edge = kj::heap<Http2EdgeServer>(io.provider->getTimer(), registry,
                                          kj::mv(http2Options));
#if CFQT_EMULATOR_QUIC
    EdgeServerOptions edgeOptions;
    edgeOptions.certFile = kj::heapString(certificates.serverCert);
    edgeOptions.keyFile = kj::heapString(certificates.serverKey);
    KJ_IF_MAYBE(p, options.tlsPriority) edgeOptions.tlsPriority = kj::heapString(*p);
    edgeOptions.transport = options.edgeTransport;
    edgeServer = kj::heap<EdgeServer>(io.unixEventPort, registry, kj::mv(edgeOptions));
    if (options.noUdp) edgeServer->setUdpBlocked(true);
    ready.udpBlocked = options.noUdp;
#else
    observe::logWarn("built without the QUIC layer: edge addresses are served on TCP only");
#endif
#if CFQT_EMULATOR_QUIC
    for (auto& text: options.edgeListen) {
      KJ_REQUIRE(quic::SocketAddress::parse(text) != nullptr,
                 "edge listen address must be numeric ip:port", text);
    }
#endif
    return bindEdges(0);
  }

  kj::Promise<void> bindEdges(size_t index) {
    if (index == options.edgeListen.size()) return kj::READY_NOW;
    return bindEdge(options.edgeListen[index], 0).then([this, index]() {
      return bindEdges(index + 1);
    });
  }

  kj::Promise<void> bindEdge(kj::StringPtr text, kj::uint attempt) {
    // TCP first: with port 0 the kernel picks a TCP port, then UDP binds the same number; if that
    // UDP port is taken, both are let go and another port is tried.
    return io.provider->getNetwork().parseAddress(text)
        .then([this, text, attempt](kj::Own<kj::NetworkAddress> parsed) -> kj::Promise<void> {
      auto receiver = parsed->listen();
      auto port = receiver->getPort();
#if CFQT_EMULATOR_QUIC
      auto udp = KJ_ASSERT_NONNULL(quic::SocketAddress::parse(text));
      bool ephemeral = udp.port() == 0;
      udp.setPort(static_cast<uint16_t>(port));
      kj::Maybe<quic::SocketAddress> bound;
      KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { bound = edgeServer->listen(udp); })) {
        if (ephemeral && attempt < MAX_PORT_ATTEMPTS) return bindEdge(text, attempt + 1);
        return kj::mv(*e);
      }
      ready.edges.add(KJ_ASSERT_NONNULL(bound).toString());
#endif
      ready.tcpEdges.add(withPort(parsed->toString(), port));
      http2Edge->listen(kj::mv(receiver));
      return kj::READY_NOW;
    });
  }

  kj::Promise<Listener> bind(kj::StringPtr address) {
    return io.provider->getNetwork().parseAddress(address)
        .then([](kj::Own<kj::NetworkAddress> parsed) {
      auto receiver = parsed->listen();
      auto bound = withPort(parsed->toString(), receiver->getPort());
      return Listener{kj::mv(receiver), kj::mv(bound)};
    });
  }

  ReadyInfo copyReady() {
    ReadyInfo copy;
    copy.api = kj::heapString(ready.api);
    KJ_IF_MAYBE(t, ready.apiTls) copy.apiTls = kj::heapString(*t);
    for (auto& e: ready.edges) copy.edges.add(kj::heapString(e));
    copy.publicAddress = kj::heapString(ready.publicAddress);
    copy.admin = kj::heapString(ready.admin);
    copy.ca = kj::heapString(ready.ca);
    copy.zone = kj::heapString(ready.zone);
    for (auto& e: ready.tcpEdges) copy.tcpEdges.add(kj::heapString(e));
    copy.udpBlocked = ready.udpBlocked;
    KJ_IF_MAYBE(d, ready.dns) copy.dns = kj::heapString(*d);
    KJ_IF_MAYBE(d, ready.dot) copy.dot = kj::heapString(*d);
    KJ_IF_MAYBE(p, ready.publicTls) copy.publicTls = kj::heapString(*p);
    return copy;
  }
};

Emulator::Emulator(kj::AsyncIoContext& io, EmulatorOptions options)
    : impl(kj::heap<Impl>(io, kj::mv(options))), registryPtr(&impl->registry),
      frontDoorPtr(&impl->frontDoor) {}

Emulator::~Emulator() noexcept(false) {}

kj::Promise<ReadyInfo> Emulator::start() { return impl->start(); }

bool Emulator::hasQuicEdge() const { return impl->hasQuicEdge(); }

size_t Emulator::http2ConnectionCount() const { return impl->http2Edge->connectionCount(); }

void Emulator::setUdpBlocked(bool blocked) { impl->setUdpBlocked(blocked); }

bool Emulator::udpBlocked() { return impl->udpBlocked(); }

uint64_t Emulator::dnsQueryCount() const {
  KJ_IF_MAYBE(d, impl->dnsServer) return (*d)->queryCount();
  return 0;
}

}  // namespace cfqt::emulator
