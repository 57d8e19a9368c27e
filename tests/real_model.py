"""Where the tests find the real model (SmolLM2-135M-Instruct): `make test` fetches it once and passes its directory
as $SWITCHBOARD_REAL_MODEL; the tests that need it skip with this reason when it is not there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REAL_MODEL = Path(os.environ.get("SWITCHBOARD_REAL_MODEL", "")).resolve()
HAVE_REAL_MODEL = bool(os.environ.get("SWITCHBOARD_REAL_MODEL")) and (REAL_MODEL / "config.json").exists()
needs_real_model = pytest.mark.skipif(
    not HAVE_REAL_MODEL,
    reason="the real model is not fetched: `make test` fetches it (switchboard fetch-model smollm2-135m --out DIR) "
    "and sets SWITCHBOARD_REAL_MODEL=DIR",
)
