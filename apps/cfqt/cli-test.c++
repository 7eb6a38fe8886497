#include "cli.h"

#include <kj/test.h>

#include <string.h>

namespace cfqt::cli {
namespace {

kj::OneOf<CliOptions, CliExit> parse(std::initializer_list<kj::StringPtr> args) {
  auto array = kj::heapArray<kj::StringPtr>(args.begin(), args.size());
  return parseCommandLine(array);
}

CliOptions ok(std::initializer_list<kj::StringPtr> args) {
  auto r = parse(args);
  KJ_IF_MAYBE(e, r.tryGet<CliExit>()) KJ_FAIL_ASSERT("parse failed", e->text);
  return kj::mv(r.get<CliOptions>());
}

kj::String err(std::initializer_list<kj::StringPtr> args) {
  auto r = parse(args);
  KJ_IF_MAYBE(e, r.tryGet<CliExit>()) {
    KJ_EXPECT(e->code == 2);
    return kj::mv(e->text);
  }
  KJ_FAIL_ASSERT("expected a parse error");
}

bool has(kj::StringPtr text, kj::StringPtr needle) {
  if (needle.size() > text.size()) return false;
  for (size_t i = 0; i + needle.size() <= text.size(); i++) {
    if (memcmp(text.begin() + i, needle.begin(), needle.size()) == 0) return true;
  }
  return false;
}

KJ_TEST("cli: cloudflared invocation forms") {
  auto a = ok({"tunnel", "--url", "http://localhost:8080", "--no-autoupdate", "--protocol", "quic"});
  KJ_EXPECT(KJ_ASSERT_NONNULL(a.url) == "http://localhost:8080");
  KJ_EXPECT(a.noAutoupdate);
  auto b = ok({"--url=localhost:3000"});
  KJ_EXPECT(KJ_ASSERT_NONNULL(b.url) == "localhost:3000");
  auto c = ok({"http://127.0.0.1:9000", "--ha-connections", "4"});
  KJ_EXPECT(KJ_ASSERT_NONNULL(c.url) == "http://127.0.0.1:9000");
  KJ_EXPECT(c.haConnections == 4);
  auto d = ok({"tunnel", "-url", "x:1", "-metrics=127.0.0.1:0", "--edge", "1.2.3.4:7844",
               "--edge=5.6.7.8:7844", "--cacert", "ca.pem"});
  KJ_EXPECT(d.edges.size() == 2);
  KJ_EXPECT(KJ_ASSERT_NONNULL(d.edgeCa) == "ca.pem");
  KJ_EXPECT(KJ_ASSERT_NONNULL(d.metrics) == "127.0.0.1:0");
  auto e = ok({"--hello-world", "--local", "--grace-period", "250ms", "--backoff-base=10ms"});
  KJ_EXPECT(e.helloWorld && e.local);
  KJ_EXPECT(e.gracePeriod == 250 * kj::MILLISECONDS);
  KJ_EXPECT(e.backoffBase == 10 * kj::MILLISECONDS);
  auto f = ok({"--hello-world=false", "--url", "a:1"});
  KJ_EXPECT(!f.helloWorld);
  auto h = ok({"--unix-socket", "/run/app.sock", "--edge-ip-version", "6", "--client-version",
               "2023.7.3", "--protocol", "quic", "--logfile", "/tmp/x.log"});
  KJ_EXPECT(KJ_ASSERT_NONNULL(h.unixSocket) == "/run/app.sock");
  KJ_EXPECT(h.edgeIpVersion == "6");
  KJ_EXPECT(h.clientVersion == "2023.7.3");
  KJ_EXPECT(KJ_ASSERT_NONNULL(h.logFile) == "/tmp/x.log");
  auto defaults = ok({"--hello-world"});
  KJ_EXPECT(defaults.haConnections == 2 && defaults.retries == 5);
  KJ_EXPECT(defaults.clientVersion == "2026.8.2");
  KJ_EXPECT(defaults.gracePeriod == 30 * kj::SECONDS);
  KJ_EXPECT(defaults.metrics == nullptr);
  auto g = ok({"tunnel"  , "--loglevel", "debug", "tunnel2:80"});
  KJ_EXPECT(KJ_ASSERT_NONNULL(g.url) == "tunnel2:80");
}

KJ_TEST("cli: errors are clear") {
  KJ_EXPECT(has(err({"--protocol", "http2", "--url", "x:1"}), "not supported"));
  KJ_EXPECT(has(err({"--bogus", "--url", "x:1"}), "unknown flag --bogus"));
  KJ_EXPECT(has(err({"--edge-ip-version", "5", "--url", "x:1"}), "auto, 4 or 6"));
  KJ_EXPECT(has(err({"--loglevel", "loud", "--url", "x:1"}), "--loglevel"));
  KJ_EXPECT(has(err({}), "nothing to expose"));
  KJ_EXPECT(has(err({"--url"}), "needs a value"));
  KJ_EXPECT(has(err({"--ha-connections", "5", "--url", "x:1"}), "between 1 and 4"));
  KJ_EXPECT(has(err({"a:1", "b:2"}), "only one origin URL"));
  KJ_EXPECT(has(err({"--grace-period", "soon", "--url", "x:1"}), "duration"));
  KJ_EXPECT(has(err({"tunnel", "run", "mytunnel"}), "only runs quick tunnels"));
  KJ_EXPECT(parse({"version"}).get<CliExit>().code == 0);
  auto help = parse({"--help"});
  KJ_EXPECT(help.get<CliExit>().code == 0);
  KJ_EXPECT(has(help.get<CliExit>().text, "--ha-connections"));
}

KJ_TEST("cli: cloudflared environment variables fill flags not given") {
  auto args = kj::heapArray<kj::StringPtr>({"--metrics", "127.0.0.1:9"});
  auto r = parseCommandLine(args, EnvLookup([](kj::StringPtr name) -> kj::Maybe<kj::String> {
    if (name == "TUNNEL_URL") return kj::str("http://127.0.0.1:8080");
    if (name == "TUNNEL_METRICS") return kj::str("127.0.0.1:1");
    if (name == "TUNNEL_GRACE_PERIOD") return kj::str("2s");
    return nullptr;
  }));
  auto& o = r.get<CliOptions>();
  KJ_EXPECT(KJ_ASSERT_NONNULL(o.url) == "http://127.0.0.1:8080");
  KJ_EXPECT(KJ_ASSERT_NONNULL(o.metrics) == "127.0.0.1:9");   // the flag wins
  KJ_EXPECT(o.gracePeriod == 2 * kj::SECONDS);
}

KJ_TEST("cli: Go durations") {
  KJ_EXPECT(KJ_ASSERT_NONNULL(parseGoDuration("1m30s")) == 90 * kj::SECONDS);
  KJ_EXPECT(KJ_ASSERT_NONNULL(parseGoDuration("1.5s")) == 1500 * kj::MILLISECONDS);
  KJ_EXPECT(KJ_ASSERT_NONNULL(parseGoDuration("30")) == 30 * kj::SECONDS);
  KJ_EXPECT(KJ_ASSERT_NONNULL(parseGoDuration("0")) == 0 * kj::SECONDS);
  KJ_EXPECT(parseGoDuration("5x") == nullptr);
  KJ_EXPECT(parseGoDuration("") == nullptr);
}

}  // namespace
}  // namespace cfqt::cli
