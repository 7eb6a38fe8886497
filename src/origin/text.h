// Small text helpers shared by pool.c++ and exchange.c++: ASCII case-insensitive comparison and
// the wording of origin failures. Private to src/origin.

#pragma once

#include <kj/exception.h>
#include <kj/string.h>

namespace cfqt::origin {

bool equalsIgnoreCase(kj::StringPtr a, kj::StringPtr b);
bool startsWithIgnoreCase(kj::StringPtr text, kj::StringPtr prefix);
bool containsIgnoreCase(kj::StringPtr text, kj::StringPtr word);
// ASCII only: header names and values, exception descriptions.

kj::String describeCause(const kj::Exception& e);
// Exception text → the "cause" part of the §6.5 error (Go-like where we can).

kj::Exception originException(kj::Exception::Type type, kj::StringPtr what);
// An exception described "origin: <what>" (Exchange::onFailure() answers it with `what`).

}  // namespace cfqt::origin
