// The public DNS of the emulated Internet (issue 16): an authoritative server for the zone of the
// issued hostnames, on UDP, TCP and DNS-over-TLS (RFC 7858, the emulator's CA). A tunnel's
// hostname gets A and AAAA records (the HTTPS front door's addresses) only `dnsDelay` after its
// first registration; before that, and for names no tunnel has, the answer is NXDOMAIN with the
// zone's SOA, whose minimum (the negative-caching TTL of RFC 2308) is `negativeTtl` -- the
// window in which a resolver that asked too early keeps the name broken.

#pragma once

#include "registry.h"

#include <kj/async-io.h>
#include <kj/compat/tls.h>
#include <kj/vector.h>

namespace cfqt::emulator {

struct DnsServerOptions {
  kj::Duration dnsDelay = 0 * kj::SECONDS;       // --dns-delay
  uint32_t negativeTtl = 1800;                   // --negative-ttl, seconds (SOA minimum)
  uint32_t answerTtl = 300;                      // TTL of the A/AAAA records
  kj::Vector<kj::Array<kj::byte>> ipv4;          // A record data (4 bytes each)
  kj::Vector<kj::Array<kj::byte>> ipv6;          // AAAA record data (16 bytes each)
  kj::Duration connectionIdleTimeout = 10 * kj::SECONDS;
  // A TCP/DoT connection that sends no complete query for this long is closed.
};

class DnsServer {
public:
  DnsServer(kj::Timer& timer, Registry& registry, DnsServerOptions options);
  // Borrows timer and registry.
  KJ_DISALLOW_COPY(DnsServer);
  ~DnsServer() noexcept(false);

  kj::Maybe<kj::Array<kj::byte>> answer(kj::ArrayPtr<const kj::byte> query);
  // The response to one DNS message, or null when it can't be answered at all (shorter than a
  // header, or itself a response). Untrusted input: never throws.

  kj::Promise<void> serveUdp(kj::DatagramPort& port);
  // Answers datagrams until the promise is dropped.

  kj::Promise<void> listenTcp(kj::ConnectionReceiver& receiver, kj::Maybe<kj::TlsContext&> tls);
  // DNS over TCP (length-prefixed messages, several per connection), or over TLS with `tls`.

  uint64_t queryCount() const { return queries; }

private:
  class ErrorHandler final: public kj::TaskSet::ErrorHandler {
  public:
    void taskFailed(kj::Exception&& exception) override;
  };

  kj::Timer& timer;
  Registry& registry;
  DnsServerOptions options;
  uint64_t queries = 0;
  ErrorHandler errorHandler;
  kj::TaskSet connections;

  kj::Promise<void> serveConnection(kj::Own<kj::AsyncIoStream> stream);
  kj::Promise<void> serveTls(kj::Own<kj::AsyncIoStream> stream, kj::TlsContext& tls);
  kj::Promise<void> readQuery(kj::AsyncIoStream& stream);
  kj::Promise<void> readMessage(kj::AsyncIoStream& stream, size_t length);
  kj::Promise<void> answerMessage(kj::AsyncIoStream& stream, kj::ArrayPtr<const kj::byte> message);
};

kj::Maybe<kj::Array<kj::byte>> parseIpBytes(kj::StringPtr ip);
// "127.0.0.1" → 4 bytes, "::1" → 16 bytes (brackets allowed); null when not an IP literal.

}  // namespace cfqt::emulator
