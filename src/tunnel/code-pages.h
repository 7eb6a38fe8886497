#pragma once
// Releasing the page-table entries of the process's code and read-only data when it goes idle
// (issue 15, idle RSS). Start-up runs a lot of code once (TLS handshakes, X.509 chains, the trust
// store, the quick-tunnel request, capnp RPC bootstrap, option parsing) and the kernel maps each
// touched page of an executable's file together with its neighbours (fault-around, 64 KiB), so
// several MiB of code stay counted in RSS after they ran for the last time.
// madvise(MADV_DONTNEED) over a read-only, file-backed private mapping only drops this process's
// page-table entries: the pages stay in the page cache (a later call is a minor fault, no disk
// I/O), and page cache that no process maps is the first memory the kernel reclaims.
//
// Only segments the program never writes are touched: PT_LOAD segments without PF_W, minus any
// page shared with a writable segment or PT_GNU_RELRO (relocated data, GOT, .data, .bss would
// lose their contents), in objects without text relocations; never the vDSO. A debugger's or
// uprobe's breakpoint in dropped code is lost (the page comes back from the file).

#include <kj/array.h>
#include <kj/common.h>

#include <stdint.h>

namespace cfqt::tunnel {

struct CodeRange {
  uintptr_t begin;   // page-aligned
  uintptr_t end;     // page-aligned, exclusive
};

enum class CodeScope {
  EXECUTABLE,        // the main program only
  ALL_OBJECTS,       // the main program and every shared object loaded (libc, GnuTLS, ...)
};

kj::Array<CodeRange> readOnlyCodeRanges(CodeScope scope);
// The page ranges releaseCodePages() would advise, in address order.

size_t releaseCodePages(CodeScope scope);
// Drops this process's page-table entries over readOnlyCodeRanges(scope); returns the bytes
// advised (not what was resident). Safe while other threads run any code: their next access is a
// minor fault. Costs a few tens of microseconds.

}  // namespace cfqt::tunnel
