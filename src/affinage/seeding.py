"""One random stream per consumer: each stage draws from a generator seeded by (seed, stage name), so adding or
removing a stage never shifts another stage's randomness."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .storage import digest


def stage_seed(seed: int, stage: str) -> int:
    """A 31-bit seed for `stage`, a pure function of (seed, stage)."""
    return int(digest("affinage-seed", str(seed), stage)[:8], 16) & 0x7FFFFFFF


@contextlib.contextmanager
def seeded(seed: int, stage: str) -> Iterator[None]:
    """Run the block with torch's global CPU generator seeded for `stage`, restored afterwards (layer inits and
    other library code that draws from the global generator get their own stream without moving anyone else's)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stage_seed(seed, stage))
        yield
