#pragma once
// `cfqt tunnel run` and `cfqt tunnel ingress validate|rule` (named tunnels, issue 19): the
// configuration file and the credentials, turned into tunnel::RunnerOptions.

#include "cli.h"

#include "named/config.h"
#include "tunnel/runner.h"

namespace cfqt::cli {

struct NamedConfig {
  kj::Maybe<named::TunnelConfig> config;   // the configuration file, once loaded
};

kj::Maybe<CliExit> loadNamedConfig(CliOptions& options, NamedConfig& loaded);
// Before validate(), for every command but a plain quick tunnel: loads --config (or
// cloudflared's default config file for `ingress` and for `run` without credentials flags) and
// applies its top-level flags (`url`, `protocol`, `loglevel`, ...) that the command line and the
// environment did not give. Returns the exit for a bad file (status 2, "cfqt: file:line: ...").

kj::Maybe<CliExit> prepareNamedTunnel(CliOptions& options, NamedConfig& loaded,
                                      tunnel::RunnerOptions& runner);
// After buildOptions(): answers `ingress validate`/`ingress rule` (returns their exit), and for
// `run` resolves the credentials (--token, --credentials-contents, --credentials-file, the
// config's credentials-file, ~/.cloudflared/<UUID>.json) and the ingress rules into `runner`.
// Returns the exit to end with (status 2 with the reason for a bad configuration), or null to
// run.

}  // namespace cfqt::cli
