"""Fixtures of the container tests: the engine (started once per run) and
the nbdluks image (built once per run)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.containers.engine import BASES, Engine, EngineUnavailable

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    e = Engine()
    try:
        e.start()
    except EngineUnavailable as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(err))
    try:
        for tag in BASES:
            e.ensure_base(tag)
        yield e
    finally:
        e.stop()


@dataclass
class Image:
    tag: str
    build_seconds: float
    size_bytes: int


@pytest.fixture(scope="session")
def image(engine: Engine) -> Image:
    started = time.monotonic()
    engine.docker("build", "-q", "-t", "nbdluks:latest", str(ROOT), timeout=1200)
    took = time.monotonic() - started
    engine.docker("image", "prune", "-f")  # the layers of earlier builds
    size = int(engine.docker("image", "inspect", "--format", "{{.Size}}",
                             "nbdluks:latest").stdout)
    print(f"\nnbdluks image: {size / 1e6:.0f} MB, built in {took:.1f} s")
    return Image("nbdluks:latest", took, size)
