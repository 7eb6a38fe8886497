// Small text helpers shared by pool.c++ and exchange.c++ (see text.h).

#include "origin/text.h"

namespace cfqt::origin {

namespace {

char lower(char c) { return (c >= 'A' && c <= 'Z') ? c + ('a' - 'A') : c; }

}  // namespace

bool equalsIgnoreCase(kj::StringPtr a, kj::StringPtr b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); i++) {
    if (lower(a[i]) != lower(b[i])) return false;
  }
  return true;
}

bool startsWithIgnoreCase(kj::StringPtr text, kj::StringPtr prefix) {
  if (text.size() < prefix.size()) return false;
  for (size_t i = 0; i < prefix.size(); i++) {
    if (lower(text[i]) != lower(prefix[i])) return false;
  }
  return true;
}

bool containsIgnoreCase(kj::StringPtr text, kj::StringPtr word) {
  if (word.size() > text.size()) return false;
  for (size_t i = 0; i + word.size() <= text.size(); i++) {
    if (startsWithIgnoreCase(text.slice(i), word)) return true;
  }
  return false;
}

kj::String describeCause(const kj::Exception& e) {
  auto text = e.getDescription();
  if (e.getType() == kj::Exception::Type::OVERLOADED && containsIgnoreCase(text, "timed out")) {
    return kj::str("i/o timeout");
  }
  if (containsIgnoreCase(text, "Connection refused")) return kj::str("connect: connection refused");
  if (containsIgnoreCase(text, "No such file")) return kj::str("connect: no such file or directory");
  return kj::str(text);
}

kj::Exception originException(kj::Exception::Type type, kj::StringPtr what) {
  return kj::Exception(type, __FILE__, __LINE__, kj::str("origin: ", what));
}

}  // namespace cfqt::origin
