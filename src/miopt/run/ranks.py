"""Which process this is in a launched job (``torchrun``, ``accelerate launch``), from the launcher's
environment: what code that runs before an ``Accelerator`` exists (or without one) asks."""

from __future__ import annotations

import os


def process_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 (also true outside a launched job); the one process that writes and reports."""
    return process_rank() == 0
