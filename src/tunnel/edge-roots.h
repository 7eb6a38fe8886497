#pragma once
// The Cloudflare edge CA certificates cloudflared trusts in addition to the system store
// (data/cloudflare-edge-roots.pem), embedded in the binary at build time.

#include <kj/string.h>

namespace cfqt::tunnel {

kj::StringPtr embeddedEdgeRootsPem();
// PEM text of every certificate (with the file's `# Subject:` comment lines).

}  // namespace cfqt::tunnel
