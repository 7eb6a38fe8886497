#pragma once
// `cfqt tunnel run` and `cfqt tunnel ingress validate|rule` (named tunnels, issue 19): the
// configuration file and the credentials, turned into tunnel::RunnerOptions.

#include "cli.h"

#include "tunnel/runner.h"

namespace cfqt::cli {

kj::Maybe<CliExit> prepareNamedTunnel(CliOptions& options, tunnel::RunnerOptions& runner);
// For every command but a plain quick tunnel: loads --config (or cloudflared's default config
// file), answers `ingress validate`/`ingress rule` (returns their exit), and for `run` resolves
// the credentials (--token, --credentials-contents, --credentials-file, the config's
// credentials-file, ~/.cloudflared/<UUID>.json) and the ingress rules into `runner`. Returns the
// exit to end with (status 2 with the reason for a bad configuration), or null to run.

}  // namespace cfqt::cli
