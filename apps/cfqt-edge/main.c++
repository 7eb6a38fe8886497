// cfqt-edge: a local Cloudflare edge for quick tunnels. Parses flags, starts an
// emulator::Emulator and prints one JSON ready line on stdout once everything listens.

#include "emulator/emulator.h"
#include "observe/log.h"

#include <kj/async-io.h>
#include <kj/async-unix.h>
#include <kj/debug.h>
#include <kj/io.h>
#include <kj/main.h>

#include <signal.h>
#include <unistd.h>

namespace cfqt::emulator {
namespace {

class EdgeMain {
public:
  explicit EdgeMain(kj::ProcessContext& context): context(context) {
    kj::_::Debug::setLogLevel(kj::LogSeverity::INFO);   // --loglevel's default
  }

  kj::MainFunc getMain() {
    return kj::MainBuilder(context, "cfqt-edge 0.1.0",
        "Plays Cloudflare's side of the quick-tunnel protocol on loopback: the quick-tunnel "
        "API (POST /tunnel), the edge (QUIC with ALPN argotunnel on UDP, HTTP/2 over TLS on TCP), "
        "the public HTTP front door and an "
        "admin API for fault injection. Prints one JSON line with the bound addresses on stdout "
        "once everything listens.")
        .addOptionWithArg({"api-listen"}, KJ_BIND_METHOD(*this, setApi), "<ip:port>",
            "Quick-tunnel API address (HTTP). Default 127.0.0.1:0.")
        .addOptionWithArg({"api-tls-listen"}, KJ_BIND_METHOD(*this, setApiTls), "<ip:port>",
            "Also serve the API over HTTPS here (server certificate; names localhost, "
            "api.trycloudflare.com, 127.0.0.1). Off by default; printed as apiTls.")
        .addOptionWithArg({"edge-listen"}, KJ_BIND_METHOD(*this, addEdge), "<ip:port>",
            "Edge address; repeat for several. Served on UDP (QUIC) and on TCP (HTTP/2 over "
            "TLS) with the same port. Default 127.0.0.1:0.")
        .addOption({"no-udp"}, KJ_BIND_METHOD(*this, setNoUdp),
            "The UDP (QUIC) side drops every datagram, as behind a firewall that blocks UDP; "
            "HTTP/2 on TCP still works. The admin API's POST /udp/unblock opens it.")
        .addOptionWithArg({"public-listen"}, KJ_BIND_METHOD(*this, setPublic), "<ip:port>",
            "Public front door address (HTTP/1.1). Default 127.0.0.1:0.")
        .addOptionWithArg({"admin-listen"}, KJ_BIND_METHOD(*this, setAdmin), "<ip:port>",
            "Admin API address (HTTP). Default 127.0.0.1:0.")
        .addOptionWithArg({"state-dir"}, KJ_BIND_METHOD(*this, setStateDir), "<dir>",
            "Where the CA and server certificate are generated/reused. "
            "Default ./cfqt-edge-state.")
        .addOptionWithArg({"zone"}, KJ_BIND_METHOD(*this, setZone), "<domain>",
            "Zone of the issued hostnames. Default trycloudflare.localhost.")
        .addOptionWithArg({"loglevel"}, KJ_BIND_METHOD(*this, setLogLevel), "<level>",
            "debug, info, warn or error (stderr). Default info.")
        .addOptionWithArg({"ca-cert"}, KJ_BIND_METHOD(*this, setCaCert), "<pem>",
            "Use this CA (with --ca-key) to sign the server certificate.")
        .addOptionWithArg({"ca-key"}, KJ_BIND_METHOD(*this, setCaKey), "<pem>",
            "Private key of --ca-cert.")
        .addOptionWithArg({"server-cert"}, KJ_BIND_METHOD(*this, setServerCert), "<pem>",
            "Use this server certificate (with --server-key) as is.")
        .addOptionWithArg({"server-key"}, KJ_BIND_METHOD(*this, setServerKey), "<pem>",
            "Private key of --server-cert.")
        .addOptionWithArg({"location"}, KJ_BIND_METHOD(*this, setLocation), "<colo>",
            "locationName returned to registrations. Default EMU.")
        .addOptionWithArg({"tls-priority"}, KJ_BIND_METHOD(*this, setTlsPriority), "<string>",
            "GnuTLS priority string of the QUIC edge.")
        .addOptionWithArg({"idle-timeout"}, KJ_BIND_METHOD(*this, setIdleTimeout), "<duration>",
            "QUIC max_idle_timeout of the edge (e.g. 5s, 300ms). Default 5s.")
        .addOptionWithArg({"handshake-timeout"}, KJ_BIND_METHOD(*this, setHandshakeTimeout),
            "<duration>", "QUIC handshake timeout. Default 10s.")
        .addOptionWithArg({"keepalive-period"}, KJ_BIND_METHOD(*this, setKeepAlive),
            "<duration>", "Edge PING period when idle; 0 disables (default).")
        .addOptionWithArg({"open-stream-timeout"}, KJ_BIND_METHOD(*this, setOpenStreamTimeout),
            "<duration>", "Front door: opening a tunnel stream (502 after). Default 10s.")
        .addOptionWithArg({"response-timeout"}, KJ_BIND_METHOD(*this, setResponseTimeout),
            "<duration>", "Front door: until the ConnectResponse (524 after). Default 100s.")
        .addOptionWithArg({"header-timeout"}, KJ_BIND_METHOD(*this, setHeaderTimeout),
            "<duration>", "HTTP servers: time to receive request headers. Default 15s.")
        .addOptionWithArg({"keepalive-timeout"}, KJ_BIND_METHOD(*this, setPipelineTimeout),
            "<duration>", "Front door: idle keep-alive time between requests. Default 5s.")
        .addOptionWithArg({"dns-listen"}, KJ_BIND_METHOD(*this, setDnsListen), "<ip:port>",
            "Authoritative DNS server for --zone on UDP and TCP (same port; port 0 picks one, "
            "printed as dns). A tunnel's hostname gets A and AAAA records pointing at the HTTPS "
            "front door (else the HTTP one). Off by default.")
        .addOptionWithArg({"dot-listen"}, KJ_BIND_METHOD(*this, setDotListen), "<ip:port>",
            "The same DNS server over DNS-over-TLS (server certificate from the emulator's CA; "
            "names localhost, 127.0.0.1). Off by default; printed as dot.")
        .addOptionWithArg({"public-tls-listen"}, KJ_BIND_METHOD(*this, setPublicTls),
            "<ip:port>", "HTTPS front door (certificate for *.<zone> from the emulator's CA; a "
            "127.x address is also served on [::1] with the same port when possible). Off by "
            "default; printed as public_tls.")
        .addOptionWithArg({"public-tls-cert"}, KJ_BIND_METHOD(*this, setPublicTlsCert), "<pem>",
            "Serve the HTTPS front door with this certificate (with --public-tls-key).")
        .addOptionWithArg({"public-tls-key"}, KJ_BIND_METHOD(*this, setPublicTlsKey), "<pem>",
            "Private key of --public-tls-cert.")
        .addOptionWithArg({"dns-delay"}, KJ_BIND_METHOD(*this, setDnsDelay), "<duration>",
            "A/AAAA records of a tunnel's hostname appear this long after its first "
            "registration; NXDOMAIN before. Default 0.")
        .addOptionWithArg({"negative-ttl"}, KJ_BIND_METHOD(*this, setNegativeTtl), "<duration>",
            "SOA minimum (negative-caching TTL) of the zone's NXDOMAIN answers. Default 30m.")
        .addOptionWithArg({"route-delay"}, KJ_BIND_METHOD(*this, setRouteDelay), "<duration>",
            "The front doors answer 530 (error 1033) for a tunnel's hostname until this long "
            "after its first registration. Default 0.")
        .callAfterParsing(KJ_BIND_METHOD(*this, run))
        .build();
  }

private:
  kj::ProcessContext& context;
  EmulatorOptions options;
  observe::LogLevel logLevel = observe::LogLevel::DEBUG;   // --loglevel (default info)

  using Validity = kj::MainBuilder::Validity;

  Validity setApi(kj::StringPtr v) { options.apiListen = kj::str(v); return true; }
  Validity setApiTls(kj::StringPtr v) { options.apiTlsListen = kj::str(v); return true; }
  Validity addEdge(kj::StringPtr v) { options.edgeListen.add(kj::str(v)); return true; }
  Validity setNoUdp() { options.noUdp = true; return true; }
  Validity setPublic(kj::StringPtr v) { options.publicListen = kj::str(v); return true; }
  Validity setAdmin(kj::StringPtr v) { options.adminListen = kj::str(v); return true; }
  Validity setStateDir(kj::StringPtr v) {
    options.certificates.stateDir = kj::str(v);
    return true;
  }
  Validity setZone(kj::StringPtr v) {
    if (v.size() == 0) return "zone must not be empty";
    options.zone = kj::str(v);
    return true;
  }
  Validity setLocation(kj::StringPtr v) { options.location = kj::str(v); return true; }
  Validity setCaCert(kj::StringPtr v) { options.certificates.caCertFile = kj::str(v); return true; }
  Validity setCaKey(kj::StringPtr v) { options.certificates.caKeyFile = kj::str(v); return true; }
  Validity setServerCert(kj::StringPtr v) {
    options.certificates.serverCertFile = kj::str(v);
    return true;
  }
  Validity setServerKey(kj::StringPtr v) {
    options.certificates.serverKeyFile = kj::str(v);
    return true;
  }
  Validity setTlsPriority(kj::StringPtr v) { options.tlsPriority = kj::str(v); return true; }

  Validity setDnsListen(kj::StringPtr v) { options.dnsListen = kj::str(v); return true; }
  Validity setDotListen(kj::StringPtr v) { options.dotListen = kj::str(v); return true; }
  Validity setPublicTls(kj::StringPtr v) { options.publicTlsListen = kj::str(v); return true; }
  Validity setPublicTlsCert(kj::StringPtr v) { options.publicTlsCert = kj::str(v); return true; }
  Validity setPublicTlsKey(kj::StringPtr v) { options.publicTlsKey = kj::str(v); return true; }
  Validity setDnsDelay(kj::StringPtr v) {
    return duration(v, [&](kj::Duration d) { options.dnsDelay = d; });
  }
  Validity setNegativeTtl(kj::StringPtr v) {
    return duration(v, [&](kj::Duration d) {
      options.negativeTtl = static_cast<uint32_t>(kj::min(d / kj::SECONDS, int64_t(0x7fffffff)));
    });
  }
  Validity setRouteDelay(kj::StringPtr v) {
    return duration(v, [&](kj::Duration d) { options.frontDoor.routeDelay = d; });
  }

  Validity setLogLevel(kj::StringPtr v) {
    if (v == "debug" || v == "info") {
      kj::_::Debug::setLogLevel(kj::LogSeverity::INFO);
      logLevel = observe::LogLevel::DEBUG;   // the emulator's own lines are all debug lines
    } else if (v == "warn" || v == "warning") {
      kj::_::Debug::setLogLevel(kj::LogSeverity::WARNING);
      logLevel = observe::LogLevel::WARN;
    } else if (v == "error" || v == "fatal") {
      kj::_::Debug::setLogLevel(kj::LogSeverity::ERROR);
      logLevel = observe::LogLevel::ERROR;
    } else {
      return "log level must be debug, info, warn or error";
    }
    return true;
  }

  template <typename Setter>
  Validity duration(kj::StringPtr v, Setter&& set) {
    KJ_IF_MAYBE(d, parseDuration(v)) {
      set(*d);
      return true;
    }
    return "expected a duration such as 250ms, 5s or 2m";
  }
  Validity setIdleTimeout(kj::StringPtr v) {
    return duration(v, [&](kj::Duration d) { options.edgeTransport.maxIdleTimeout = d; });
  }
  Validity setHandshakeTimeout(kj::StringPtr v) {
    return duration(v, [&](kj::Duration d) { options.edgeTransport.handshakeTimeout = d; });
  }
  Validity setKeepAlive(kj::StringPtr v) {
    return duration(v, [&](kj::Duration d) { options.edgeTransport.keepAlivePeriod = d; });
  }
  Validity setOpenStreamTimeout(kj::StringPtr v) {
    return duration(v, [&](kj::Duration d) { options.frontDoor.openStreamTimeout = d; });
  }
  Validity setResponseTimeout(kj::StringPtr v) {
    return duration(v, [&](kj::Duration d) { options.frontDoor.responseHeadTimeout = d; });
  }
  Validity setHeaderTimeout(kj::StringPtr v) {
    return duration(v, [&](kj::Duration d) {
      options.frontDoor.headerTimeout = d;
      options.apiHeaderTimeout = d;
    });
  }
  Validity setPipelineTimeout(kj::StringPtr v) {
    return duration(v, [&](kj::Duration d) { options.frontDoor.pipelineTimeout = d; });
  }

  Validity run() {
    kj::UnixEventPort::captureSignal(SIGTERM);
    kj::UnixEventPort::captureSignal(SIGINT);
    signal(SIGPIPE, SIG_IGN);
    observe::LogConfig logConfig;
    logConfig.level = logLevel;
    logConfig.rateInterval = 0 * kj::SECONDS;   // a test tool: every line, as KJ_LOG wrote them
    observe::Logger logger(kj::mv(logConfig));
    observe::LogCallback logCallback(logger);   // the same line format for capnp's own lines
    auto io = kj::setupAsyncIo();
    Emulator emulator(io, kj::mv(options));
    ReadyInfo ready;
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
      ready = emulator.start().wait(io.waitScope);
    })) {
      context.exitError(kj::str("cfqt-edge: cannot start: ", e->getDescription()));
    }
    auto line = kj::str(ready.toJson(), '\n');
    kj::FdOutputStream(STDOUT_FILENO).write(line.begin(), line.size());
    io.unixEventPort.onSignal(SIGTERM).exclusiveJoin(io.unixEventPort.onSignal(SIGINT))
        .wait(io.waitScope);
    observe::logDebug("cfqt-edge stopping");
    return true;
  }
};

}  // namespace
}  // namespace cfqt::emulator

KJ_MAIN(cfqt::emulator::EdgeMain)
