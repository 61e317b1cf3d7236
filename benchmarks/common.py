"""Helpers shared by the benchmarks: resident-memory readings and one-subprocess-per-measure runs.

Peak memory on Linux: ``ru_maxrss`` (and ``VmHWM`` in /proc/self/status) is the process's
high-water mark since it started. A measure that follows an expensive set-up (e.g. loading a
1.3 GB checkpoint, which briefly holds the file's tensors and the model's at once) would read
the set-up's peak, not its own. ``reset_peak_rss`` writes "5" to /proc/self/clear_refs, which
resets the kernel's high-water mark to the current RSS (Linux >= 4.0), so that the peak read
after the measured call is that call's own peak on top of what was resident before it.
"""

import json
import os
import resource
import subprocess
import sys
from typing import List, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is None:
        raise RuntimeError("/proc/self/status has no VmRSS (not Linux?)")
    return kib * 1024


def peak_rss_bytes() -> int:
    """ru_maxrss of this process, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def hwm_bytes() -> Optional[int]:
    """VmHWM (the mm's own high-water mark), in bytes."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset the peak-RSS mark to the current RSS; True if the kernel accepted it and
    ``ru_maxrss`` followed (it keeps an older, larger value once a thread has exited)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    # allow for the pages touched between the two readings
    return peak_rss_bytes() <= current_rss_bytes() + 16 * 2**20


def gb(num_bytes: float) -> str:
    return f"{num_bytes / 1e9:.2f} GB"


def mb(num_bytes: float) -> str:
    return f"{num_bytes / 1e6:.1f} MB"


def run_json_subprocess(argv: List[str], env: Optional[dict] = None) -> dict:
    """Run ``python argv...`` in a fresh interpreter; its LAST stdout line must be a JSON object.
    Its stderr is passed through (fairseq logs there)."""
    cmd = [sys.executable] + argv
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"{' '.join(cmd)} printed nothing")
    return json.loads(lines[-1])
