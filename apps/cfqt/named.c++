#include "named.h"

#include "named/config.h"
#include "named/credentials.h"
#include "named/ingress.h"

#include "edge/quick-tunnel-api.h"

#include <kj/debug.h>

#include <stdlib.h>
#include <sys/stat.h>

namespace cfqt::cli {

namespace {

bool isSetByName(const CliOptions& o, kj::StringPtr flag) {
  for (auto& s: o.explicitlySet) if (s == flag) return true;
  return false;
}

bool isFile(kj::StringPtr path) {
  struct stat st;
  return ::stat(path.cStr(), &st) == 0 && S_ISREG(st.st_mode);
}

kj::OneOf<named::TunnelCredentials, kj::String> resolveCredentials(
    CliOptions& o, kj::Maybe<named::TunnelConfig&> config) {
  KJ_IF_MAYBE(token, o.token) return named::parseToken(*token);
  KJ_IF_MAYBE(contents, o.credentialsContents) {
    return named::parseCredentialsJson(*contents, "--credentials-contents");
  }
  KJ_IF_MAYBE(file, o.credentialsFile) return named::readCredentialsFile(*file);
  KJ_IF_MAYBE(c, config) {
    KJ_IF_MAYBE(file, c->credentialsFile) return named::readCredentialsFile(*file);
  }
  kj::Maybe<kj::StringPtr> target;
  KJ_IF_MAYBE(t, o.runTarget) target = t->asPtr();
  else KJ_IF_MAYBE(c, config) KJ_IF_MAYBE(t, c->tunnel) target = t->asPtr();
  KJ_IF_MAYBE(t, target) {
    KJ_IF_MAYBE(id, edge::parseUuid(*t)) {
      // cloudflared's default: <origin cert dir>/<UUID>.json.
      auto uuid = edge::formatUuid(*id);
      kj::Vector<kj::String> candidates;
      const char* home = getenv("HOME");
      if (home != nullptr && home[0] != '\0') {
        candidates.add(kj::str(home, "/.cloudflared/", uuid, ".json"));
      }
      candidates.add(kj::str("/etc/cloudflared/", uuid, ".json"));
      for (auto& path: candidates) {
        if (isFile(path)) return named::readCredentialsFile(path);
      }
      return kj::str("no credentials for tunnel ", uuid, ": give --token T, "
                     "--credentials-file FILE or credentials-file: in the config (looked for ",
                     kj::strArray(candidates, " and "), ")");
    }
    return kj::str("cannot resolve the tunnel name \"", *t, "\": cfqt finds a tunnel only through "
                   "--token, --credentials-file/--credentials-contents or the config's "
                   "credentials-file (resolving a name through Cloudflare's API needs an account "
                   "certificate from `cloudflared tunnel login`, which cfqt does not use)");
  }
  return kj::str("tunnel run needs the tunnel's credentials: --token T (or TUNNEL_TOKEN), "
                 "--credentials-file FILE, --credentials-contents JSON, or a --config file with "
                 "tunnel: and credentials-file:");
}

}  // namespace

kj::Maybe<CliExit> loadNamedConfig(CliOptions& o, NamedConfig& loaded) {
  using Command = CliOptions::Command;
  kj::Maybe<kj::String> configPath;
  KJ_IF_MAYBE(c, o.configFile) configPath = kj::str(*c);
  else if (o.command != Command::RUN || (o.token == nullptr && o.credentialsFile == nullptr &&
                                         o.credentialsContents == nullptr)) {
    configPath = named::findDefaultConfigFile();
  }
  KJ_IF_MAYBE(path, configPath) {
    KJ_SWITCH_ONEOF(named::loadConfigFile(*path)) {
      KJ_CASE_ONEOF(error, kj::String) return configError(error);
      KJ_CASE_ONEOF(c, named::TunnelConfig) {
        for (auto& flag: c.flags) {
          KJ_IF_MAYBE(error, applyConfigFileFlag(o, flag.name, flag.value)) {
            return configError(kj::str(*path, ":", flag.line, ": ", *error));
          }
        }
        loaded.config = kj::mv(c);
      }
    }
  }
  return nullptr;
}

kj::Maybe<CliExit> prepareNamedTunnel(CliOptions& o, NamedConfig& loaded,
                                      tunnel::RunnerOptions& r) {
  using Command = CliOptions::Command;
  auto& config = loaded.config;

  if (o.command == Command::INGRESS_VALIDATE || o.command == Command::INGRESS_RULE) {
    named::TunnelConfig* c = nullptr;
    KJ_IF_MAYBE(cc, config) c = cc;
    if (c == nullptr) {
      return configError("no configuration file: give --config FILE (or put config.yml in "
                         "~/.cloudflared or /etc/cloudflared)");
    }
    if (o.command == Command::INGRESS_VALIDATE) {
      auto head = kj::str("Validating rules from ", c->source, "\n");
      KJ_IF_MAYBE(error, named::validateIngress(c->ingress)) {
        return CliExit{1, kj::str(head, "Validation failed: ", *error, "\n")};
      }
      return CliExit{0, kj::str(head, "OK\n")};
    }
    auto built = named::Ingress::build(c->ingress, c->originRequest, origin::OriginConfig());
    KJ_SWITCH_ONEOF(built) {
      KJ_CASE_ONEOF(error, kj::String) {
        return CliExit{1, kj::str("Validation failed: ", error, "\n")};
      }
      KJ_CASE_ONEOF(ingress, kj::Own<named::Ingress>) {
        auto url = kj::str(KJ_ASSERT_NONNULL(o.ingressRuleUrl));
        kj::StringPtr rest = url;
        KJ_IF_MAYBE(sep, url.findFirst(':')) {
          if (url.slice(*sep).startsWith("://")) rest = url.slice(*sep + 3);
        }
        size_t hostEnd = 0;
        while (hostEnd < rest.size() && rest[hostEnd] != '/' && rest[hostEnd] != '?') hostEnd++;
        if (hostEnd == 0) {
          return configError(kj::str("\"", url, "\" has no hostname: give a URL such as "
                                     "https://app.example.com/path"));
        }
        auto host = kj::heapString(rest.slice(0, hostEnd));
        auto path = named::requestPath(kj::str("https://", rest));
        auto index = ingress->match(host, path);
        return CliExit{0, kj::str("Using rules from ", c->source, "\nMatched rule #", index,
                                  "\n", ingress->describe(index))};
      }
    }
    KJ_UNREACHABLE;
  }

  if (o.command == Command::QUICK) {
    // `cfqt tunnel --config FILE` without `run`: cloudflared runs the file's tunnel if it names
    // one, else a quick tunnel with the file's flags.
    bool namesTunnel = false;
    KJ_IF_MAYBE(c, config) namesTunnel = c->tunnel != nullptr || c->credentialsFile != nullptr;
    if (!namesTunnel) {
      if (!o.helloWorld && o.url == nullptr && o.unixSocket == nullptr) {
        return configError("nothing to expose: give an origin URL (cfqt http://localhost:8080), "
                           "--hello-world, --unix-socket PATH, or url: in the configuration file");
      }
      return nullptr;
    }
    if (!isSetByName(o, "ha-connections")) r.haConnections = 4;
  }

  // tunnel run
  kj::Maybe<named::TunnelConfig&> configRef;
  KJ_IF_MAYBE(c, config) configRef = *c;
  KJ_SWITCH_ONEOF(resolveCredentials(o, configRef)) {
    KJ_CASE_ONEOF(error, kj::String) return configError(error);
    KJ_CASE_ONEOF(credentials, named::TunnelCredentials) {
      r.namedTunnel = kj::mv(credentials);
    }
  }
  bool singleOrigin = o.helloWorld || o.url != nullptr || o.unixSocket != nullptr;
  if (!singleOrigin) {
    bool haveRules = false;
    KJ_IF_MAYBE(c, config) haveRules = c->ingress.size() > 0;
    if (haveRules) {
      KJ_IF_MAYBE(error, named::validateIngress(KJ_ASSERT_NONNULL(config).ingress)) {
        return configError(kj::str(KJ_ASSERT_NONNULL(config).source, ": ", *error));
      }
      r.ingressConfig = kj::heap<named::TunnelConfig>(kj::mv(KJ_ASSERT_NONNULL(config)));
    } else {
      // cloudflared without ingress rules (a remotely managed tunnel before its first push):
      // every request is answered 503 until a configuration arrives.
      auto base = kj::mv(r.origin);
      r.origin = origin::httpStatusOrigin(503);
      r.origin.connectTimeout = base.connectTimeout;
      r.origin.tlsTimeout = base.tlsTimeout;
      r.origin.keepAliveTimeout = base.keepAliveTimeout;
      r.origin.helloSseInterval = base.helloSseInterval;
      r.service = kj::str("http_status:503");
    }
  }
  return nullptr;
}

}  // namespace cfqt::cli
