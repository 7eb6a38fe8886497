// Page ranges of read-only segments (dl_iterate_phdr) and their release (code-pages.h).

#include "tunnel/code-pages.h"

#include <kj/vector.h>

#include <algorithm>
#include <elf.h>
#include <link.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <unistd.h>

namespace cfqt::tunnel {
namespace {

struct Collector {
  CodeScope scope;
  uintptr_t pageSize;
  uintptr_t vdso;
  kj::Vector<CodeRange> ranges;
  unsigned objects = 0;
};

bool hasTextRelocations(const dl_phdr_info& info) {
  for (size_t i = 0; i < info.dlpi_phnum; i++) {
    auto& ph = info.dlpi_phdr[i];
    if (ph.p_type != PT_DYNAMIC) continue;
    auto dyn = reinterpret_cast<const ElfW(Dyn)*>(info.dlpi_addr + ph.p_vaddr);
    for (; dyn->d_tag != DT_NULL; dyn++) {
      if (dyn->d_tag == DT_TEXTREL) return true;
      if (dyn->d_tag == DT_FLAGS && (dyn->d_un.d_val & DF_TEXTREL) != 0) return true;
    }
  }
  return false;
}

int collectObject(dl_phdr_info* info, size_t, void* data) {
  auto& c = *static_cast<Collector*>(data);
  // The first object dl_iterate_phdr reports is the main program.
  bool isMain = c.objects++ == 0;
  auto down = [&](uintptr_t a) { return a & ~(c.pageSize - 1); };
  auto up = [&](uintptr_t a) { return (a + c.pageSize - 1) & ~(c.pageSize - 1); };

  kj::Vector<CodeRange> readOnly;
  kj::Vector<CodeRange> written;
  for (size_t i = 0; i < info->dlpi_phnum; i++) {
    auto& ph = info->dlpi_phdr[i];
    uintptr_t begin = info->dlpi_addr + ph.p_vaddr;
    uintptr_t end = begin + ph.p_memsz;
    if (ph.p_type == PT_LOAD && (ph.p_flags & PF_W) == 0) {
      if (c.vdso != 0 && begin <= c.vdso && c.vdso < end) return 0;   // the vDSO: not a file
      readOnly.add(CodeRange{down(begin), up(end)});
    } else if ((ph.p_type == PT_LOAD && (ph.p_flags & PF_W) != 0) || ph.p_type == PT_GNU_RELRO) {
      written.add(CodeRange{down(begin), up(end)});
    }
  }
  if (c.scope == CodeScope::EXECUTABLE && !isMain) return 0;
  if (readOnly.size() == 0 || hasTextRelocations(*info)) return 0;
  for (auto& r: readOnly) {
    // Cut out every page a written segment touches (none with ld's page-aligned layout).
    kj::Vector<CodeRange> pieces;
    pieces.add(r);
    for (auto& w: written) {
      kj::Vector<CodeRange> next;
      for (auto& p: pieces) {
        if (w.end <= p.begin || p.end <= w.begin) {
          next.add(p);
          continue;
        }
        if (p.begin < w.begin) next.add(CodeRange{p.begin, w.begin});
        if (w.end < p.end) next.add(CodeRange{w.end, p.end});
      }
      pieces = kj::mv(next);
    }
    for (auto& p: pieces) {
      if (p.begin < p.end) c.ranges.add(p);
    }
  }
  if (c.scope == CodeScope::EXECUTABLE) return 1;   // done after the main program
  return 0;
}

}  // namespace

kj::Array<CodeRange> readOnlyCodeRanges(CodeScope scope) {
  Collector c{scope, uintptr_t(sysconf(_SC_PAGESIZE)), uintptr_t(getauxval(AT_SYSINFO_EHDR)), {}};
  dl_iterate_phdr(collectObject, &c);
  auto ranges = c.ranges.releaseAsArray();
  std::sort(ranges.begin(), ranges.end(),
            [](const CodeRange& a, const CodeRange& b) { return a.begin < b.begin; });
  return ranges;
}

size_t releaseCodePages(CodeScope scope) {
  size_t total = 0;
  for (auto& r: readOnlyCodeRanges(scope)) {
    // Failure (a range another thread just unmapped with dlclose) only means nothing is dropped.
    if (madvise(reinterpret_cast<void*>(r.begin), r.end - r.begin, MADV_DONTNEED) == 0) {
      total += r.end - r.begin;
    }
  }
  return total;
}

}  // namespace cfqt::tunnel
