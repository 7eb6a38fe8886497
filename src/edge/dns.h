#pragma once
// DnsResolver: c-ares (1.18) driven by the KJ event loop -- one UnixEventPort::FdObserver per
// c-ares socket (via the socket-state callback), c-ares timeouts on the kj::Timer, no blocking
// calls after construction. Also the DNS-over-TLS SRV client of PROTOCOL.md §2.2 (query built and
// parsed by c-ares, framed per RFC 7858 / DNS-over-TCP, carried by kj-tls).

#include "edge/edge-address.h"

#include <kj/async-io.h>
#include <kj/async-unix.h>
#include <kj/string.h>
#include <kj/time.h>

namespace kj { class TlsContext; }

namespace cfqt::edge {

struct SrvRecord {
  kj::String target;     // without the trailing dot
  uint16_t port;
  uint16_t priority;
  uint16_t weight;
};

struct DnsResolverOptions {
  kj::Maybe<kj::String> server;
  // "ip:port" or "[ipv6]:port" (`--dns-server`); null = the system's /etc/resolv.conf servers.

  kj::Duration queryTimeout = 5 * kj::SECONDS;
  // c-ares per-try timeout (ARES_OPT_TIMEOUTMS); c-ares grows it on later tries.

  uint tries = 2;
  // c-ares ARES_OPT_TRIES.

  bool useHostsFile = true;
  // Whether host lookups also read /etc/hosts first ("fb"), as the system resolver does.
};

class DnsResolver {
public:
  DnsResolver(kj::UnixEventPort& eventPort, kj::Timer& timer, DnsResolverOptions options);
  // Throws FAILED (bad `server` text or c-ares init failure). Reads /etc/resolv.conf once when no
  // server is given. `eventPort` and `timer` must outlive the resolver.
  ~DnsResolver() noexcept(false);
  KJ_DISALLOW_COPY(DnsResolver);

  kj::Promise<kj::Array<SrvRecord>> querySrv(kj::StringPtr name);
  // Records in answer order. Rejects (FAILED, description "DNS SRV lookup of <name> failed:
  // <c-ares reason>") on NXDOMAIN, no answer, SERVFAIL, timeout (OVERLOADED) etc. The resolver must
  // outlive the promise; dropping the promise does not cancel the c-ares query (it is bounded by
  // the timeouts) but its result is discarded.

  kj::Promise<kj::Array<EdgeAddress>> resolveHost(kj::StringPtr host, uint16_t port);
  // A and AAAA of `host`, in c-ares' RFC 6724 order (like Go's), each with `port`. An IP literal
  // resolves to itself. Rejects "DNS lookup of <host> failed: <reason>" when nothing is found.

private:
  class Impl;
  kj::Own<Impl> impl;
};

struct DotServer {
  EdgeAddress address;     // ip + port (default 1.1.1.1:853)
  kj::String tlsName;      // certificate name to verify (default cloudflare-dns.com)
};

kj::Maybe<DotServer> parseDotServer(kj::StringPtr text);
// "ip:port[#tls-name]"; without "#name" the TLS name is the IP text. Null when malformed.

kj::Promise<kj::Array<SrvRecord>> querySrvOverTls(
    kj::Timer& timer, kj::Network& network, const DotServer& server, kj::StringPtr name,
    kj::Duration timeout);
// One SRV query over DNS-over-TLS (a fresh kj::TlsContext with the system trust store, so
// SSL_CERT_FILE applies). Rejects with a description naming the server on connect / TLS /
// timeout / malformed answer / NXDOMAIN / no records. `timer`, `network`, `server` must outlive the
// promise; `name` is copied.

struct SrvAnswer {
  kj::Array<SrvRecord> records;  // in answer order; empty on error
  kj::String error;              // "" on success, else why the answer is unusable
};

SrvAnswer decodeSrvResponse(kj::ArrayPtr<const kj::byte> message, uint16_t queryId);
// One DNS response message (without the 2-byte TCP length prefix) to the SRV query `queryId`:
// checks id, QR bit and rcode, then parses the answers with c-ares. Untrusted input: never
// throws; `error` says why ("malformed answer: ...", "no records of that type (NODATA)", ...).
// Records whose target is not a host name (letters, digits, '-', '_' in dot-separated labels;
// the "." of "no service" included) are dropped; none left is a malformed answer.
// Used by querySrvOverTls(); exposed for tests.

struct AddressAnswer {
  kj::Array<kj::String> addresses;  // IP addresses as text, in answer order; empty on error
  kj::String error;                 // "" on success, else why there is no usable address
  bool notFound = false;            // NXDOMAIN or NODATA: the name has no such record (yet)
  bool nxdomain = false;            // NXDOMAIN: the name itself does not exist (yet)
};

AddressAnswer decodeAddressResponse(kj::ArrayPtr<const kj::byte> message, uint16_t queryId,
                                    bool ipv6);
// One DNS response (without the TCP length prefix) to the A (or, with `ipv6`, AAAA) query
// `queryId`: checks id, QR, TC and rcode, then parses the answers with c-ares (CNAME chains
// followed). Untrusted input: never throws; at most 32 addresses are kept.

kj::Promise<AddressAnswer> queryAddressOverTls(
    kj::Timer& timer, kj::Network& network, const DotServer& server, kj::StringPtr name,
    bool ipv6, kj::Duration timeout, kj::TlsContext& tls);
// One A/AAAA query over DNS-over-TLS, the server verified by `tls` (the caller's trust roots).
// NXDOMAIN and NODATA resolve as answers (notFound); connect, TLS, framing and timeout failures
// reject with a description naming the server. Everything passed must outlive the promise.

}  // namespace cfqt::edge
