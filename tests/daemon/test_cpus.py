"""CPUs the server may use: the cgroup quota caps the affinity."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nbdluks.daemon.cpus import cgroup_quota, quota_v1, quota_v2, usable_cpus


@pytest.mark.parametrize(("text", "cpus"), [
    ("max 100000", None), ("150000 100000", 1.5), ("50000 100000", 0.5), ("junk", None),
    ("0 100000", None),
])
def test_cgroup_v2_cpu_max(text: str, cpus: float | None) -> None:
    assert quota_v2(text) == cpus


def test_cgroup_v1_quota() -> None:
    assert quota_v1("-1", "100000") is None
    assert quota_v1("200000\n", "100000\n") == 2.0


def test_a_quota_caps_the_processes(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(tmp_path) == 1.5
    assert usable_cpus(tmp_path) == min(2, len(os.sched_getaffinity(0)))
    (tmp_path / "cpu.max").write_text("max 100000\n")  # v2 wins, and says: no quota
    assert cgroup_quota(tmp_path) is None
    assert usable_cpus(tmp_path) == len(os.sched_getaffinity(0))
