"""Transparent huge pages for host memory: XLA on CPU otherwise page-faults its buffers every call.

XLA's CPU runtime allocates each program's temporaries (one block of tens of MB for a batched
prefill: cache windows, activations) afresh per call; glibc serves blocks over 32 MB with a new
mmap, so every call touches fresh 4 KiB pages: ~20k page faults, ~10% of a 32-row tool-result
append on a 2-core host. glibc >= 2.35 can back such blocks with 2 MiB pages
(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, with THP in `madvise` or `always` mode), ~100x fewer
faults. glibc reads tunables only at process start, so the entry points (`cli.run`, the
benchmarks) re-execute themselves once with it set, before anything else runs. Set
`STEPSEARCH_HUGEPAGE_MALLOC=0` to opt out; torch in the same process gets the same allocator.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
_OPT_OUT = "STEPSEARCH_HUGEPAGE_MALLOC"


def _glibc_supports_hugetlb() -> bool:
  lib, version = platform.libc_ver()
  if lib != "glibc":
    return False
  try:
    major, minor = (int(x) for x in version.split(".")[:2])
  except ValueError:
    return False
  return (major, minor) >= (2, 35)


def enabled() -> bool:
  return TUNABLE in os.environ.get("GLIBC_TUNABLES", "")


def reexec_with_hugepages() -> None:
  """Re-run this process (same interpreter and argv) with the tunable set, once; else no-op."""
  if (enabled() or os.environ.get(_OPT_OUT, "1") == "0" or not sys.platform.startswith("linux")
      or not _glibc_supports_hugetlb()):
    return
  current = os.environ.get("GLIBC_TUNABLES", "")
  os.environ["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE  # ends the loop
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable] + sys.orig_argv[1:])
