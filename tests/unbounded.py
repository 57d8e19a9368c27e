"""Lift the served magnitude bound while a test registers adapters whose output overflows.

Load-time validation (`check_served`, `check_probe`) refuses such adapters in float32, but it cannot foresee every
overflow (a bounded adapter can still overflow float16 activations, or a base model's own activations can). The
engine's isolation must hold anyway, so its tests register overflowing adapters with the bound lifted.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from switchboard.adapters_store.kinds import base


@contextmanager
def served_bound_lifted() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(base, "MAX_SERVED_MAGNITUDE", float("inf"))
        yield
