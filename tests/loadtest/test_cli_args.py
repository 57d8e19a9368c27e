"""`switchboard loadtest` arguments become one validated LoadTestConfig (DESIGN's CLI contract)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from switchboard.loadtest.config import Endpoint, LengthSpec, Popularity
from switchboard.loadtest.main import add_arguments, config_from_args


def _parse(*argv: str):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_design_contract_flags() -> None:
    cfg = _parse(
        "--url", "http://h:8000/v1", "--adapters", "a,b,c", "--rate", "2.5", "--duration", "30", "--zipf", "1.2",
        "--out", "o", "--prompt-len", "8:16", "--slo-ttft-ms", "500",
    )  # fmt: skip
    assert (cfg.url, cfg.rate, cfg.concurrency, cfg.duration_s) == ("http://h:8000", 2.5, None, 30.0)
    assert cfg.adapters == ["a", "b", "c"] and cfg.popularity is Popularity.ZIPF and cfg.zipf_alpha == 1.2
    assert cfg.prompt_len == LengthSpec(8, 16) and cfg.output_len == LengthSpec(64, 64)
    assert cfg.out == Path("o") and cfg.slo_ttft_ms == 500 and cfg.slo_tpot_ms is None
    assert cfg.endpoint is Endpoint.COMPLETIONS and cfg.ignore_eos


def test_conflicting_flags_are_refused() -> None:
    with pytest.raises(ValueError, match="--zipf implies"):
        _parse("--url", "u", "--rate", "1", "--duration", "1", "--zipf", "1", "--popularity", "uniform")
    with pytest.raises(ValueError, match="stop by itself"):
        _parse("--url", "u", "--concurrency", "4")
    with pytest.raises(ValueError, match="--upload-model needs"):
        _parse("--url", "u", "--rate", "1", "--duration", "1", "--upload-model", "m")
    with pytest.raises(ValueError, match="text"):
        _parse("--url", "u", "--rate", "1", "--duration", "1", "--endpoint", "chat")
    with pytest.raises(SystemExit):  # argparse: --rate and --concurrency are exclusive
        _parse("--url", "u", "--rate", "1", "--concurrency", "2", "--duration", "1")
