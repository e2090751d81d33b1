"""node.security.diskguard: watermarks with hysteresis, on a fake statvfs and on a real small tmpfs."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from peers import tmpfs

from node.security.diskguard import DiskGuard, usage


class FakeDisk:
    def __init__(self, total_blocks: int = 1000) -> None:
        self.total = total_blocks
        self.used = 0

    def statvfs(self, path: str) -> SimpleNamespace:
        free = self.total - self.used
        return SimpleNamespace(f_blocks=self.total, f_bavail=free, f_bfree=free, f_frsize=4096)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.timeout(30)
def test_hysteresis_between_the_marks(caplog):
    disk, clock = FakeDisk(), Clock()
    guard = DiskGuard("/data", 95, 90, interval=0, statvfs=disk.statvfs, clock=clock)
    caplog.set_level(logging.WARNING, logger="modelnode.diskguard")
    steps = [(500, True), (949, True), (950, False), (990, False), (920, False), (901, False), (900, True),
             (940, True), (960, False)]
    got = []
    for used, _ in steps:
        disk.used = used
        got.append(guard.accepting())
    assert got == [want for _, want in steps]
    # One log line per crossing, not per check.
    crossings = [r.levelname for r in caplog.records]
    assert crossings == ["ERROR", "WARNING", "ERROR"]


@pytest.mark.timeout(30)
def test_min_free_is_a_floor():
    disk, clock = FakeDisk(total_blocks=100_000), Clock()  # 390 MiB
    guard = DiskGuard("/data", 99, 98, min_free_mb=100, interval=0, statvfs=disk.statvfs, clock=clock)
    disk.used = 100_000 - 25_000  # 97.6 MiB free, 75% used
    assert not guard.accepting()
    disk.used = 100_000 - 26_000  # 101.5 MiB free
    assert guard.accepting()


@pytest.mark.timeout(30)
def test_statvfs_is_rate_limited():
    disk, clock = FakeDisk(), Clock()
    calls = []

    def counting(path: str) -> SimpleNamespace:
        calls.append(path)
        return disk.statvfs(path)

    guard = DiskGuard("/data", 95, 90, interval=0.5, statvfs=counting, clock=clock)
    for _ in range(100):
        guard.accepting()
    assert len(calls) == 1
    disk.used = 990
    assert guard.accepting()  # cached answer within the interval
    clock.t = 0.6
    assert not guard.accepting()
    assert len(calls) == 2


@pytest.mark.timeout(30)
def test_stat_failure_keeps_the_last_answer():
    def failing(path: str) -> SimpleNamespace:
        raise FileNotFoundError(path)

    guard = DiskGuard("/nonexistent", interval=0, statvfs=failing)
    assert guard.accepting()


@pytest.mark.timeout(30)
def test_bad_marks_are_refused():
    with pytest.raises(ValueError):
        DiskGuard("/", 80, 90)


@pytest.mark.timeout(30)
def test_config_marks(tmp_path):
    from node.config import ConfigError, parse_config

    cfg = parse_config({"storage": {"data_dir": str(tmp_path), "high_water_percent": 80, "low_water_percent": 70}})
    guard = DiskGuard.from_config(cfg)
    assert (guard.high, guard.low, guard.path) == (80.0, 70.0, tmp_path)
    with pytest.raises(ConfigError) as info:
        parse_config({"storage": {"high_water_percent": 101.0, "low_water_percent": 0, "min_free_mb": -1}})
    keys = {k for k, _ in info.value.problems}
    assert keys == {"storage.high_water_percent", "storage.low_water_percent", "storage.min_free_mb"}


# --------------------------------------------------------------------------- a real file system


@pytest.fixture
def small_tmpfs(tmp_path) -> Iterator[Path]:
    with tmpfs(tmp_path / "mnt", 8) as mnt:
        yield mnt


def fill(path: Path, mib: int) -> None:
    with open(path, "wb") as fh:
        for _ in range(mib):
            fh.write(os.urandom(1 << 20))


@pytest.mark.timeout(60)
def test_real_tmpfs_fills_and_recovers(small_tmpfs):
    guard = DiskGuard(small_tmpfs, 75, 50, interval=0)
    assert usage(small_tmpfs).total_bytes == 8 << 20
    assert guard.accepting()
    fill(small_tmpfs / "a", 4)  # 50%
    assert guard.accepting()
    fill(small_tmpfs / "b", 2)  # 75%
    assert not guard.accepting()
    (small_tmpfs / "b").unlink()  # back to 50%: the low-water mark
    assert guard.accepting()
    state = guard.state()
    assert state["accepting"] == 1.0 and 49 <= state["used_percent"] <= 51
