"""How many CPUs this process may really use: its affinity, capped by the
CPU quota of its cgroup (a container's `--cpus`, a pod's CPU limit), which
os.cpu_count() does not see."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def quota_v2(cpu_max: str) -> float | None:
    """cgroup v2 `cpu.max`: "QUOTA PERIOD" or "max PERIOD"."""
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def quota_v1(quota_us: str, period_us: str) -> float | None:
    """cgroup v1 `cpu.cfs_quota_us` (-1: none) and `cpu.cfs_period_us`."""
    try:
        quota, period = int(quota_us), int(period_us)
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _own_cgroup_v2(root: Path) -> Path:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return root / line[3:].lstrip("/")
    except OSError:
        pass
    return root


def cgroup_quota(root: Path = CGROUP) -> float | None:
    """CPUs the cgroup quota allows (fractional), None without one."""
    for path in (_own_cgroup_v2(root) / "cpu.max", root / "cpu.max"):
        try:
            return quota_v2(path.read_text())
        except OSError:
            continue
    for d in ("cpu", "cpu,cpuacct"):
        try:
            return quota_v1((root / d / "cpu.cfs_quota_us").read_text(),
                            (root / d / "cpu.cfs_period_us").read_text())
        except OSError:
            continue
    return None


def usable_cpus(root: Path = CGROUP) -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = cgroup_quota(root)
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)
