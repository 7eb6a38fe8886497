#include "dns.h"
#include "observe/log.h"

#include <ares.h>

#include <kj/compat/tls.h>
#include <kj/debug.h>
#include <kj/map.h>
#include <kj/vector.h>

#include <arpa/inet.h>
#include <arpa/nameser.h>
#include <netinet/in.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>

namespace cfqt::edge {

namespace {

kj::Exception aresException(int status, kj::String what) {
  auto type = status == ARES_ETIMEOUT ? kj::Exception::Type::OVERLOADED
            : status == ARES_EDESTRUCTION || status == ARES_ECANCELLED
                ? kj::Exception::Type::DISCONNECTED
                : kj::Exception::Type::FAILED;
  kj::StringPtr reason = ares_strerror(status);
  if (status == ARES_ENODATA) reason = "no records of that type (NODATA)";
  if (status == ARES_ENOTFOUND) reason = "domain name not found (NXDOMAIN)";
  if (status == ARES_ETIMEOUT) reason = "timed out (no answer from the DNS server)";
  if (status == ARES_ECONNREFUSED) reason = "connection refused by the DNS server";
  if (status == ARES_ESERVFAIL) reason = "the DNS server failed (SERVFAIL)";
  if (status == ARES_EREFUSED) reason = "the DNS server refused the query (REFUSED)";
  return kj::Exception(type, __FILE__, __LINE__, kj::str(what, ": ", reason));
}

bool isHostname(kj::StringPtr name) {
  // Letters, digits, '-' and '_' in non-empty labels of at most 63, 253 in all. c-ares hands
  // out a label holding other bytes escaped (backslash sequences), which no edge name has.
  if (name.size() == 0 || name.size() > 253) return false;
  size_t label = 0;
  for (char c: name) {
    if (c == '.') {
      if (label == 0) return false;
      label = 0;
      continue;
    }
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '_';
    if (!ok || ++label > 63) return false;
  }
  return label > 0;
}

kj::Maybe<kj::Array<SrvRecord>> parseSrvAnswer(const unsigned char* buf, int len,
                                               int* statusOut) {
  struct ares_srv_reply* reply = nullptr;
  int status = ares_parse_srv_reply(buf, len, &reply);
  *statusOut = status;
  if (status != ARES_SUCCESS) return nullptr;
  KJ_DEFER(ares_free_data(reply));
  kj::Vector<SrvRecord> records;
  size_t dropped = 0;
  for (auto r = reply; r != nullptr; r = r->next) {
    kj::StringPtr host = r->host == nullptr ? "" : r->host;
    auto name = host.endsWith(".") ? kj::heapString(host.slice(0, host.size() - 1))
                                   : kj::heapString(host);
    if (!isHostname(name)) {
      // Not a host name (the "." of "no service here", or bytes no DNS name of the edge has,
      // found by fuzz/dns_answer): the record is of no use.
      dropped++;
      continue;
    }
    records.add(SrvRecord{kj::mv(name), r->port, r->priority, r->weight});
  }
  if (records.size() == 0 && dropped > 0) {
    *statusOut = ARES_EBADRESP;
    return nullptr;
  }
  if (records.size() == 0) {
    // c-ares can succeed without a single SRV record (answers of other types only); to callers
    // that is "no records", as documented for querySrv()/querySrvOverTls().
    *statusOut = ARES_ENODATA;
    return nullptr;
  }
  return records.releaseAsArray();
}

}  // namespace

// =============================================================================================

class DnsResolver::Impl final: private kj::TaskSet::ErrorHandler {
public:
  Impl(kj::UnixEventPort& eventPort, kj::Timer& timer, DnsResolverOptions options)
      : eventPort(eventPort), timer(timer), tasks(*this) {
    int status = ares_library_init(ARES_LIB_INIT_ALL);
    KJ_REQUIRE(status == ARES_SUCCESS, "c-ares library init failed", ares_strerror(status));
    libraryInitialized = true;

    struct ares_options opts;
    memset(&opts, 0, sizeof(opts));
    int mask = ARES_OPT_SOCK_STATE_CB | ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES | ARES_OPT_LOOKUPS;
    opts.sock_state_cb = &Impl::onSocketState;
    opts.sock_state_cb_data = this;
    opts.timeout = kj::max(1, static_cast<int>(options.queryTimeout / kj::MILLISECONDS));
    opts.tries = kj::max(1u, options.tries);
    char lookups[3] = {'f', 'b', '\0'};
    opts.lookups = options.useHostsFile ? lookups : lookups + 1;
    status = ares_init_options(&channel, &opts, mask);
    if (status != ARES_SUCCESS) {
      channel = nullptr;
      ares_library_cleanup();
      KJ_FAIL_REQUIRE("c-ares init failed", ares_strerror(status));
    }
    KJ_IF_MAYBE(server, options.server) {
      status = ares_set_servers_ports_csv(channel, server->cStr());
      if (status != ARES_SUCCESS) {
        ares_destroy(channel);   // the destructor will not run
        channel = nullptr;
        ares_library_cleanup();
        KJ_FAIL_REQUIRE("invalid --dns-server (want ip:port or [ipv6]:port)", *server,
                        ares_strerror(status));
      }
    }
  }

  ~Impl() noexcept(false) {
    if (channel != nullptr) {
      // Fails pending queries with ARES_EDESTRUCTION and closes the sockets (each through
      // onSocketState(fd, 0, 0) first, which drops its FdObserver while the fd is still open).
      ares_destroy(channel);
    }
    if (libraryInitialized) ares_library_cleanup();
  }

  kj::Promise<kj::Array<SrvRecord>> querySrv(kj::StringPtr name) {
    auto paf = kj::newPromiseAndFulfiller<kj::Array<SrvRecord>>();
    auto query = kj::heap<SrvQuery>(*this, nextId++, kj::heapString(name), kj::mv(paf.fulfiller));
    auto& ref = *query;
    queries.insert(ref.id, kj::mv(query));
    ares_query(channel, ref.name.cStr(), ns_c_in, ns_t_srv, &Impl::onSrvAnswer, &ref);
    scheduleProcess();
    return kj::mv(paf.promise);
  }

  kj::Promise<kj::Array<EdgeAddress>> resolveHost(kj::StringPtr host, uint16_t port) {
    KJ_IF_MAYBE(literal, parseIp(host, port)) {
      return kj::arr(*literal);
    }
    auto paf = kj::newPromiseAndFulfiller<kj::Array<EdgeAddress>>();
    auto query = kj::heap<HostQuery>(*this, nextId++, kj::heapString(host), port,
                                     kj::mv(paf.fulfiller));
    auto& ref = *query;
    queries.insert(ref.id, kj::mv(query));
    struct ares_addrinfo_hints hints;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_DGRAM;
    ares_getaddrinfo(channel, ref.name.cStr(), nullptr, &hints, &Impl::onAddrInfo, &ref);
    scheduleProcess();
    return kj::mv(paf.promise);
  }

private:
  struct Query {
    Query(Impl& impl, uint64_t id, kj::String name): impl(impl), id(id), name(kj::mv(name)) {}
    virtual ~Query() noexcept(false) = default;
    Impl& impl;
    uint64_t id;
    kj::String name;
  };
  struct SrvQuery final: public Query {
    SrvQuery(Impl& impl, uint64_t id, kj::String name,
             kj::Own<kj::PromiseFulfiller<kj::Array<SrvRecord>>> fulfiller)
        : Query(impl, id, kj::mv(name)), fulfiller(kj::mv(fulfiller)) {}
    kj::Own<kj::PromiseFulfiller<kj::Array<SrvRecord>>> fulfiller;
  };
  struct HostQuery final: public Query {
    HostQuery(Impl& impl, uint64_t id, kj::String name, uint16_t port,
              kj::Own<kj::PromiseFulfiller<kj::Array<EdgeAddress>>> fulfiller)
        : Query(impl, id, kj::mv(name)), port(port), fulfiller(kj::mv(fulfiller)) {}
    uint16_t port;
    kj::Own<kj::PromiseFulfiller<kj::Array<EdgeAddress>>> fulfiller;
  };

  // One per c-ares socket. The fd belongs to c-ares; the observer is dropped (onSocketState with
  // no interest) before c-ares closes it. Waits only set a flag and schedule processing, so a
  // watch is never destroyed from inside its own continuation.
  struct Watch {
    int fd;
    bool wantRead = false;
    bool wantWrite = false;
    bool readArmed = false;
    bool writeArmed = false;
    kj::Own<kj::UnixEventPort::FdObserver> observer;
    kj::Promise<void> readWait = nullptr;
    kj::Promise<void> writeWait = nullptr;
  };

  kj::UnixEventPort& eventPort;
  kj::Timer& timer;
  bool libraryInitialized = false;
  ares_channel channel = nullptr;
  uint64_t nextId = 1;
  kj::HashMap<uint64_t, kj::Own<Query>> queries;
  kj::HashMap<int, kj::Own<Watch>> watches;
  bool processScheduled = false;
  kj::Promise<void> timeoutWait = nullptr;
  kj::TaskSet tasks;   // last: pending work is cancelled first

  void taskFailed(kj::Exception&& exception) override {
    observe::logError("c-ares processing failed", observe::Fields().error(exception));
  }

  // --- c-ares callbacks (C: nothing may throw through them) ---

  static void onSocketState(void* data, ares_socket_t fd, int readable, int writable) {
    auto& self = *reinterpret_cast<Impl*>(data);
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
      self.socketState(fd, readable != 0, writable != 0);
    })) {
      observe::logError("c-ares socket state update failed", observe::Fields().error(*e));
    }
  }

  void socketState(int fd, bool readable, bool writable) {
    if (!readable && !writable) {
      watches.erase(fd);
      return;
    }
    auto& watch = *watches.findOrCreate(fd, [&]() -> decltype(watches)::Entry {
      auto w = kj::heap<Watch>();
      w->fd = fd;
      w->observer = kj::heap<kj::UnixEventPort::FdObserver>(
          eventPort, fd, kj::UnixEventPort::FdObserver::OBSERVE_READ_WRITE);
      return {fd, kj::mv(w)};
    });
    watch.wantRead = readable;
    watch.wantWrite = writable;
    scheduleProcess();
  }

  static void onSrvAnswer(void* arg, int status, int timeouts, unsigned char* buf, int len) {
    auto& query = *reinterpret_cast<SrvQuery*>(arg);
    auto& impl = query.impl;
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
      auto what = kj::str("DNS SRV lookup of ", query.name, " failed");
      if (status != ARES_SUCCESS) {
        query.fulfiller->reject(aresException(status, kj::mv(what)));
        return;
      }
      int parseStatus;
      KJ_IF_MAYBE(records, parseSrvAnswer(buf, len, &parseStatus)) {
        query.fulfiller->fulfill(kj::mv(*records));
      } else {
        query.fulfiller->reject(aresException(parseStatus, kj::mv(what)));
      }
    })) {
      query.fulfiller->reject(kj::mv(*e));
    }
    impl.queries.erase(query.id);
  }

  static void onAddrInfo(void* arg, int status, int timeouts, struct ares_addrinfo* result) {
    auto& query = *reinterpret_cast<HostQuery*>(arg);
    auto& impl = query.impl;
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
      KJ_DEFER(if (result != nullptr) ares_freeaddrinfo(result));
      auto what = kj::str("DNS lookup of ", query.name, " failed");
      if (status != ARES_SUCCESS) {
        query.fulfiller->reject(aresException(status, kj::mv(what)));
        return;
      }
      kj::Vector<EdgeAddress> addresses;
      for (auto node = result->nodes; node != nullptr; node = node->ai_next) {
        if (node->ai_addr == nullptr) continue;
        auto bytes = kj::arrayPtr(reinterpret_cast<const kj::byte*>(node->ai_addr),
                                  node->ai_addrlen);
        KJ_IF_MAYBE(a, fromSockaddr(bytes, query.port)) {
          bool duplicate = false;
          for (auto& existing: addresses) {
            if (existing == *a) duplicate = true;
          }
          if (!duplicate) addresses.add(*a);
        }
      }
      if (addresses.size() == 0) {
        query.fulfiller->reject(aresException(ARES_ENODATA, kj::mv(what)));
      } else {
        query.fulfiller->fulfill(addresses.releaseAsArray());
      }
    })) {
      query.fulfiller->reject(kj::mv(*e));
    }
    impl.queries.erase(query.id);
  }

  // --- driving c-ares from the event loop ---

  void scheduleProcess() {
    if (processScheduled) return;
    processScheduled = true;
    tasks.add(kj::evalLater([this]() { processNow(); }));
  }

  static short readiness(int fd, short events) {
    struct pollfd p;
    p.fd = fd;
    p.events = events;
    p.revents = 0;
    int n = ::poll(&p, 1, 0);
    return n > 0 ? p.revents : 0;
  }

  void processNow() {
    processScheduled = false;
    kj::Vector<int> fds;
    for (auto& entry: watches) fds.add(entry.key);
    for (int fd: fds) {
      KJ_IF_MAYBE(w, watches.find(fd)) {
        auto& watch = **w;
        short events = (watch.wantRead ? POLLIN : 0) | (watch.wantWrite ? POLLOUT : 0);
        short ready = readiness(fd, events);
        bool r = watch.wantRead && (ready & (POLLIN | POLLERR | POLLHUP));
        bool wr = watch.wantWrite && (ready & (POLLOUT | POLLERR | POLLHUP));
        if (r || wr) {
          ares_process_fd(channel, r ? fd : ARES_SOCKET_BAD, wr ? fd : ARES_SOCKET_BAD);
        }
      }
    }
    ares_process_fd(channel, ARES_SOCKET_BAD, ARES_SOCKET_BAD);   // timeouts
    rearm();
  }

  void rearm() {
    for (auto& entry: watches) {
      auto& watch = *entry.value;
      short events = (watch.wantRead ? POLLIN : 0) | (watch.wantWrite ? POLLOUT : 0);
      if (events == 0) continue;
      if (readiness(watch.fd, events) & (events | POLLERR | POLLHUP)) {
        scheduleProcess();   // still ready: process again before waiting on an edge
        continue;
      }
      if (watch.wantRead && !watch.readArmed) {
        watch.readArmed = true;
        watch.readWait = watch.observer->whenBecomesReadable().then([this, &watch]() {
          watch.readArmed = false;
          scheduleProcess();
        }).eagerlyEvaluate([](kj::Exception&& e) {
          observe::logError("c-ares read wait", observe::Fields().error(e));
        });
      }
      if (watch.wantWrite && !watch.writeArmed) {
        watch.writeArmed = true;
        watch.writeWait = watch.observer->whenBecomesWritable().then([this, &watch]() {
          watch.writeArmed = false;
          scheduleProcess();
        }).eagerlyEvaluate([](kj::Exception&& e) {
          observe::logError("c-ares write wait", observe::Fields().error(e));
        });
      }
    }
    struct timeval tv;
    if (ares_timeout(channel, nullptr, &tv) != nullptr) {
      auto delay = (tv.tv_sec * 1000 + (tv.tv_usec + 999) / 1000) * kj::MILLISECONDS;
      timeoutWait = timer.afterDelay(kj::max(delay, 1 * kj::MILLISECONDS)).then([this]() {
        scheduleProcess();
      }).eagerlyEvaluate([](kj::Exception&& e) { observe::logError("c-ares timer", observe::Fields()
          .error(e)); });
    } else {
      timeoutWait = nullptr;
    }
  }
};

DnsResolver::DnsResolver(kj::UnixEventPort& eventPort, kj::Timer& timer,
                         DnsResolverOptions options)
    : impl(kj::heap<Impl>(eventPort, timer, kj::mv(options))) {}

DnsResolver::~DnsResolver() noexcept(false) {}

kj::Promise<kj::Array<SrvRecord>> DnsResolver::querySrv(kj::StringPtr name) {
  return impl->querySrv(name);
}

kj::Promise<kj::Array<EdgeAddress>> DnsResolver::resolveHost(kj::StringPtr host, uint16_t port) {
  return impl->resolveHost(host, port);
}

// =============================================================================================
// DNS over TLS (RFC 7858): one query per connection, DNS-over-TCP framing.

kj::Maybe<DotServer> parseDotServer(kj::StringPtr text) {
  kj::String addressText;
  kj::Maybe<kj::String> name;
  KJ_IF_MAYBE(hash, text.findFirst('#')) {
    addressText = kj::heapString(text.slice(0, *hash));
    auto n = text.slice(*hash + 1);
    if (n.size() == 0) return nullptr;
    name = kj::heapString(n);
  } else {
    addressText = kj::heapString(text);
  }
  KJ_IF_MAYBE(address, parseIpPort(addressText)) {
    kj::String tlsName;
    KJ_IF_MAYBE(n, name) { tlsName = kj::mv(*n); } else { tlsName = address->ipString(); }
    return DotServer{*address, kj::mv(tlsName)};
  }
  return nullptr;
}

namespace {

constexpr size_t MAX_DNS_MESSAGE = 65535;

class DotExchange {
  // One query over DNS-over-TLS: the raw answer message (without its length prefix), or a
  // rejection whose description names the server and what failed.
public:
  DotExchange(kj::Network& network, const DotServer& server, kj::String name, int type,
              kj::Maybe<kj::TlsContext&> tlsContext)
      : network(network), server(server), name(kj::mv(name)), type(type),
        tlsContext(tlsContext) {}

  kj::Promise<kj::Array<kj::byte>> run() {
    unsigned char* buf = nullptr;
    int len = 0;
    queryId = static_cast<uint16_t>(
        (kj::systemPreciseMonotonicClock().now() - kj::origin<kj::TimePoint>()) / kj::NANOSECONDS);
    int status = ares_create_query(name.cStr(), ns_c_in, type, queryId, 1, &buf, &len, 0);
    if (status != ARES_SUCCESS) {
      return fail(kj::str("cannot build the query: ", ares_strerror(status)));
    }
    KJ_DEFER(ares_free_string(buf));
    request = kj::heapArray<kj::byte>(len + 2);
    request[0] = len >> 8;
    request[1] = len & 0xff;
    memcpy(request.begin() + 2, buf, len);

    auto address = server.address.toNetworkAddress(network);
    auto promise = address->connect();
    return promise.attach(kj::mv(address)).then(
        [this](kj::Own<kj::AsyncIoStream> s) { return startTls(kj::mv(s)); },
        [this](kj::Exception&& e) {
      return fail(kj::str("cannot connect: ", e.getDescription()));
    });
  }

  kj::String what() {
    kj::StringPtr kind = type == ns_t_srv ? "SRV"_kj : type == ns_t_aaaa ? "AAAA"_kj : "A"_kj;
    return kj::str("DNS-over-TLS ", kind, " lookup of ", name, " via ", server.address.toString(),
                   " (", server.tlsName, ") failed");
  }

  uint16_t id() const { return queryId; }

private:
  kj::Network& network;
  const DotServer& server;
  kj::String name;
  int type;
  kj::Maybe<kj::TlsContext&> tlsContext;
  uint16_t queryId = 0;
  kj::Array<kj::byte> request;
  kj::byte lengthPrefix[2];
  kj::Array<kj::byte> response;
  kj::Own<kj::TlsContext> ownTls;
  kj::Own<kj::AsyncIoStream> stream;

  kj::Promise<kj::Array<kj::byte>> fail(kj::String reason,
                                        kj::Exception::Type type = kj::Exception::Type::FAILED) {
    return kj::Exception(type, __FILE__, __LINE__, kj::str(what(), ": ", reason));
  }

  kj::Promise<kj::Array<kj::byte>> startTls(kj::Own<kj::AsyncIoStream> s) {
    kj::TlsContext* tls;
    KJ_IF_MAYBE(t, tlsContext) {
      tls = t;
    } else {
      ownTls = kj::heap<kj::TlsContext>();   // system trust store (SSL_CERT_FILE applies)
      tls = ownTls.get();
    }
    return tls->wrapClient(kj::mv(s), server.tlsName).then(
        [this](kj::Own<kj::AsyncIoStream> s) { return send(kj::mv(s)); },
        [this](kj::Exception&& e) {
      return fail(kj::str("TLS handshake failed: ", e.getDescription()));
    });
  }

  kj::Promise<kj::Array<kj::byte>> send(kj::Own<kj::AsyncIoStream> s) {
    stream = kj::mv(s);
    return stream->write(request.begin(), request.size()).then([this]() {
      return stream->tryRead(lengthPrefix, 2, 2);
    }).then([this](size_t n) { return readAnswer(n); });
  }

  kj::Promise<kj::Array<kj::byte>> readAnswer(size_t lengthBytes) {
    if (lengthBytes < 2) return fail(kj::str("the server closed the connection without an answer"));
    size_t len = (size_t(lengthPrefix[0]) << 8) | lengthPrefix[1];
    if (len < 12) return fail(kj::str("malformed answer (", len, " bytes)"));
    response = kj::heapArray<kj::byte>(len);
    return stream->tryRead(response.begin(), len, len)
        .then([this](size_t got) -> kj::Promise<kj::Array<kj::byte>> {
      if (got < response.size()) return fail(kj::str("truncated answer"));
      return kj::mv(response);
    });
  }
};

template <typename T>
kj::Promise<T> withDotTimeout(kj::Timer& timer, kj::Duration timeout, kj::String what,
                              kj::Promise<T> promise) {
  return timer.timeoutAfter(timeout, kj::mv(promise))
      .catch_([what = kj::mv(what), timeout](kj::Exception&& e) -> kj::Promise<T> {
    if (e.getDescription() == "operation timed out"_kj) {
      return kj::Exception(kj::Exception::Type::OVERLOADED, __FILE__, __LINE__,
          kj::str(what, ": timed out after ", timeout / kj::MILLISECONDS, " ms"));
    }
    return kj::mv(e);
  });
}

}  // namespace

SrvAnswer decodeSrvResponse(kj::ArrayPtr<const kj::byte> message, uint16_t queryId) {
  auto failed = [](kj::String reason) { return SrvAnswer{nullptr, kj::mv(reason)}; };
  if (message.size() < 12) return failed(kj::str("malformed answer (", message.size(), " bytes)"));
  uint16_t id = (uint16_t(message[0]) << 8) | message[1];
  if (id != queryId) return failed(kj::str("answer for another query id"));
  if ((message[2] & 0x80) == 0) return failed(kj::str("malformed answer (not a response)"));
  uint rcode = message[3] & 0x0f;
  if (rcode == 3) return failed(kj::str("domain name not found (NXDOMAIN)"));
  if (rcode != 0) return failed(kj::str("the DNS server answered rcode ", rcode));
  if (message.size() > MAX_DNS_MESSAGE) return failed(kj::str("malformed answer (too long)"));
  int status;
  KJ_IF_MAYBE(records, parseSrvAnswer(message.begin(), int(message.size()), &status)) {
    return SrvAnswer{kj::mv(*records), kj::str()};
  }
  if (status == ARES_ENODATA) return failed(kj::str("no records of that type (NODATA)"));
  return failed(kj::str("malformed answer: ", ares_strerror(status)));
}

kj::Promise<kj::Array<SrvRecord>> querySrvOverTls(
    kj::Timer& timer, kj::Network& network, const DotServer& server, kj::StringPtr name,
    kj::Duration timeout) {
  auto exchange = kj::heap<DotExchange>(network, server, kj::heapString(name), ns_t_srv, nullptr);
  auto what = exchange->what();
  auto& ref = *exchange;
  auto promise = kj::evalNow([&]() { return ref.run(); })
      .then([&ref](kj::Array<kj::byte> message) -> kj::Promise<kj::Array<SrvRecord>> {
    auto answer = decodeSrvResponse(message, ref.id());
    if (answer.error.size() > 0) {
      return kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__,
                           kj::str(ref.what(), ": ", answer.error));
    }
    return kj::mv(answer.records);
  }).attach(kj::mv(exchange));
  return withDotTimeout(timer, timeout, kj::mv(what), kj::mv(promise));
}

AddressAnswer decodeAddressResponse(kj::ArrayPtr<const kj::byte> message, uint16_t queryId,
                                    bool ipv6) {
  auto failed = [](kj::String reason, bool notFound = false, bool nxdomain = false) {
    return AddressAnswer{nullptr, kj::mv(reason), notFound, nxdomain};
  };
  if (message.size() < 12) return failed(kj::str("malformed answer (", message.size(), " bytes)"));
  uint16_t id = (uint16_t(message[0]) << 8) | message[1];
  if (id != queryId) return failed(kj::str("answer for another query id"));
  if ((message[2] & 0x80) == 0) return failed(kj::str("malformed answer (not a response)"));
  if ((message[2] & 0x02) != 0) return failed(kj::str("truncated answer (TC)"));
  uint rcode = message[3] & 0x0f;
  if (rcode == 3) return failed(kj::str("domain name not found (NXDOMAIN)"), true, true);
  if (rcode != 0) return failed(kj::str("the DNS server answered rcode ", rcode));
  if (message.size() > MAX_DNS_MESSAGE) return failed(kj::str("malformed answer (too long)"));
  constexpr int MAX_ADDRESSES = 32;
  kj::Vector<kj::String> addresses;
  int count = MAX_ADDRESSES;
  int status;
  char text[INET6_ADDRSTRLEN];
  if (ipv6) {
    struct ares_addr6ttl ttls[MAX_ADDRESSES];
    status = ares_parse_aaaa_reply(message.begin(), int(message.size()), nullptr, ttls, &count);
    if (status == ARES_SUCCESS) {
      for (int i = 0; i < count && i < MAX_ADDRESSES; i++) {
        if (inet_ntop(AF_INET6, &ttls[i].ip6addr, text, sizeof(text)) != nullptr) {
          addresses.add(kj::str(text));
        }
      }
    }
  } else {
    struct ares_addrttl ttls[MAX_ADDRESSES];
    status = ares_parse_a_reply(message.begin(), int(message.size()), nullptr, ttls, &count);
    if (status == ARES_SUCCESS) {
      for (int i = 0; i < count && i < MAX_ADDRESSES; i++) {
        if (inet_ntop(AF_INET, &ttls[i].ipaddr, text, sizeof(text)) != nullptr) {
          addresses.add(kj::str(text));
        }
      }
    }
  }
  if (status == ARES_ENODATA || (status == ARES_SUCCESS && addresses.size() == 0)) {
    return failed(kj::str("no records of that type (NODATA)"), true);
  }
  if (status != ARES_SUCCESS) return failed(kj::str("malformed answer: ", ares_strerror(status)));
  return AddressAnswer{addresses.releaseAsArray(), kj::str(), false};
}

kj::Promise<AddressAnswer> queryAddressOverTls(
    kj::Timer& timer, kj::Network& network, const DotServer& server, kj::StringPtr name,
    bool ipv6, kj::Duration timeout, kj::TlsContext& tls) {
  auto exchange = kj::heap<DotExchange>(network, server, kj::heapString(name),
                                        ipv6 ? ns_t_aaaa : ns_t_a, tls);
  auto what = exchange->what();
  auto& ref = *exchange;
  auto promise = kj::evalNow([&]() { return ref.run(); })
      .then([&ref, ipv6](kj::Array<kj::byte> message) {
    return decodeAddressResponse(message, ref.id(), ipv6);
  }).attach(kj::mv(exchange));
  return withDotTimeout(timer, timeout, kj::mv(what), kj::mv(promise));
}

}  // namespace cfqt::edge
