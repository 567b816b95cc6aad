"""Process memory on Linux, for per-run peaks: the kernel keeps the peak resident set size
(VmHWM in /proc/self/status), and writing "5" to /proc/self/clear_refs resets it to the
current RSS, so several prunes or benchmarks in one process each get their own peak."""

from __future__ import annotations

from pathlib import Path

CLEAR_REFS, STATUS = Path("/proc/self/clear_refs"), Path("/proc/self/status")


def status_kb(key: str) -> int | None:
    """A kB field of /proc/self/status (VmRSS, VmHWM, ...); None off Linux."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """VmHWM := VmRSS. False where not possible (not Linux, not permitted)."""
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False
