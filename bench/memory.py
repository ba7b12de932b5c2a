"""Peak resident memory of this process, for the CPU benchmarks (Linux /proc, glibc)."""

import ctypes
import gc
from pathlib import Path

GIB = 1024**3


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Writing 5 to clear_refs resets VmHWM (the peak resident set size) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    """Hand memory that earlier work freed back to the OS, so that the next case's RSS starts
    from what is really held (glibc keeps freed heap otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_case(fn) -> tuple[object, int, int, bool]:
    """Run fn; return (its result, RSS before it, peak RSS during it, whether the peak is
    exact - VmHWM could be reset - or the process-wide peak)."""
    release_freed_memory()
    before = proc_status_bytes("VmRSS")
    exact = reset_peak_rss()
    result = fn()
    return result, before, proc_status_bytes("VmHWM"), exact
