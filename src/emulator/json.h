// Minimal JSON text helpers for the emulator's API and admin answers (writing only).

#pragma once

#include <kj/string.h>

namespace cfqt::emulator {

kj::String jsonString(kj::StringPtr text);
// `text` as a quoted JSON string; control characters and non-ASCII bytes below 0x20 escaped.

}  // namespace cfqt::emulator
