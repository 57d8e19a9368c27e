"""`switchboard bench-train` on the tiny model: every method trains, and NF4 serving is compared with bf16."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from switchboard.bench.train import ROWS, run_bench_train
from switchboard.training.tasks import persona

from ..training.conftest import write_jsonl


def test_bench_train_reports_every_method_and_the_nf4_ratio(tiny_model_dir: Path, tmp_path: Path) -> None:
    import random

    data = write_jsonl(tmp_path / "persona.jsonl", persona(random.Random(0), 40))
    args = argparse.Namespace(
        data=data,
        steps=2,
        batch_size=4,
        num_requests=2,
        prompt_len=8,
        max_tokens=4,
        repeats=1,
        out=tmp_path / "train.json",
    )
    report = run_bench_train(args, tiny_model_dir)
    rows = report["training"]["rows"]
    assert [r["method"] for r in rows] == [label for label, *_ in ROWS]
    full = rows[0]
    assert full["kind"] == "full" and full["throughput_percent_of_full"] == 100.0
    assert all(0 < r["trainable_parameters"] < full["trainable_parameters"] for r in rows[1:])
    assert all(r["peak_memory_bytes"] > 0 and r["tokens_per_second"] > 0 for r in rows)
    serving = report["serving"]["results"]
    assert serving["bf16"]["ratio_to_bf16_paired"] == 1.0
    assert serving["nf4"]["base_weight_bytes"]["linear"] < 0.3 * serving["bf16"]["base_weight_bytes"]["linear"]
    assert json.loads(args.out.read_text())["serving"]["results"]["nf4"]["tokens_per_second"] > 0
    assert args.out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
