// The built-in `--hello-world` origin (PROTOCOL.md §9.1): a kj::HttpService answering `/` (an HTML
// page showing the request), `/ws` (WebSocket echo of messages under 1 MiB; a larger one is
// answered with Close 1009 "message too big"), `/sse` (one event per interval) and `/_health`.
// Origin serves it in-process over in-memory pipes; private to src/origin.

#pragma once

#include <kj/async-io.h>
#include <kj/compat/http.h>
#include <kj/timer.h>

namespace cfqt::origin {

kj::Own<kj::HttpService> newHelloWorldService(kj::Timer& timer, const kj::HttpHeaderTable& table,
                                              kj::Duration sseInterval);
// `timer` and `table` must outlive the service. The service keeps no per-request state of its own.

}  // namespace cfqt::origin
