#include "json.h"

#include <kj/vector.h>

namespace cfqt::emulator {

kj::String jsonString(kj::StringPtr text) {
  kj::Vector<char> out(text.size() + 2);
  out.add('"');
  for (char c: text) {
    switch (c) {
      case '"': out.addAll(kj::StringPtr("\\\"")); break;
      case '\\': out.addAll(kj::StringPtr("\\\\")); break;
      case '\n': out.addAll(kj::StringPtr("\\n")); break;
      case '\r': out.addAll(kj::StringPtr("\\r")); break;
      case '\t': out.addAll(kj::StringPtr("\\t")); break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          constexpr char HEX[] = "0123456789abcdef";
          out.addAll(kj::StringPtr("\\u00"));
          out.add(HEX[(c >> 4) & 0xf]);
          out.add(HEX[c & 0xf]);
        } else {
          out.add(c);
        }
    }
  }
  out.add('"');
  out.add('\0');
  return kj::String(out.releaseAsArray());
}

}  // namespace cfqt::emulator
