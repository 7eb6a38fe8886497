// ReadyProbe (issue 16) on its own: what it refuses to probe, and how it gives up. The stages
// against a real DNS-over-TLS server and HTTPS front door are tested end to end
// (tests/e2e/ready_e2e.py, public-api-test.c++).

#include "tunnel/ready-probe.h"

#include <kj/debug.h>
#include <kj/test.h>

namespace cfqt::tunnel {
namespace {

bool has(kj::StringPtr text, kj::StringPtr needle) {
  for (size_t i = 0; i + needle.size() <= text.size(); i++) {
    if (text.slice(i).startsWith(needle)) return true;
  }
  return false;
}

observe::LogConfig quiet() {
  observe::LogConfig config;
  config.level = observe::LogLevel::ERROR;
  config.toStderr = false;
  return config;
}

KJ_TEST("ReadyProbe refuses a hostname that is not a DNS name, without echoing control bytes") {
  auto io = kj::setupAsyncIo();
  observe::Logger logger(quiet());
  ReadyProbeConfig config;
  config.resolvers.add(kj::str("127.0.0.1:1#localhost"));
  ReadyProbe probe(io.provider->getTimer(), io.provider->getNetwork(), logger, config);
  KJ_EXPECT_THROW_MESSAGE("is not a DNS name",
                          probe.run("evil\r\nX-Injected: 1.example", "token").wait(io.waitScope));
  auto& failure = KJ_ASSERT_NONNULL(probe.failure());
  KJ_EXPECT(failure.stage == ReadyStage::DNS);
  KJ_EXPECT(failure.message.findFirst('\r') == nullptr && failure.message.findFirst('\n') == nullptr,
            failure.message);
}

KJ_TEST("ReadyProbe gives up after its timeout naming the DNS stage and the last answer") {
  auto io = kj::setupAsyncIo();
  observe::Logger logger(quiet());
  // A port where nothing listens: every DoT query fails to connect.
  auto receiver = io.provider->getNetwork().parseAddress("127.0.0.1:0").wait(io.waitScope)
      ->listen();
  auto port = receiver->getPort();
  receiver = nullptr;
  ReadyProbeConfig config;
  config.resolvers.add(kj::str("127.0.0.1:", port, "#localhost"));
  config.timeout = 300 * kj::MILLISECONDS;
  config.initialBackoff = 10 * kj::MILLISECONDS;
  config.attemptTimeout = 100 * kj::MILLISECONDS;
  ReadyProbe probe(io.provider->getTimer(), io.provider->getNetwork(), logger, config);
  auto started = io.provider->getTimer().now();
  KJ_EXPECT_THROW_MESSAGE("DNS stage", probe.run("a-b-c.example.com", "token").wait(io.waitScope));
  KJ_EXPECT(io.provider->getTimer().now() - started >= 300 * kj::MILLISECONDS);
  auto& failure = KJ_ASSERT_NONNULL(probe.failure());
  KJ_EXPECT(failure.stage == ReadyStage::DNS);
  KJ_EXPECT(has(failure.message, "a-b-c.example.com") &&
            has(failure.message, "cannot connect"), failure.message);
}

KJ_TEST("readyResolverError") {
  KJ_EXPECT(readyResolverError("1.1.1.1:853#cloudflare-dns.com") == nullptr);
  KJ_EXPECT(readyResolverError("[2606:4700:4700::1111]:853") == nullptr);
  KJ_EXPECT(readyResolverError("dns.google:853") != nullptr);
  KJ_EXPECT(readyResolverError("1.1.1.1:853#") != nullptr);
}

}  // namespace
}  // namespace cfqt::tunnel
