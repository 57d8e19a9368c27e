"""`switchboard profile` end to end on the tiny model: every configuration measured, ratios from the same run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def test_profile_runs_and_reports_ratios_to_base(tiny_model_dir: Path, tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("switchboard")
    cmd = [
        str(script),
        "profile",
        "--model",
        str(tiny_model_dir),
        "--kinds",
        "lora,ia3,prefix,krona,mixed",
        "--num-adapters",
        "4",
        "--batch-sizes",
        "1,4",
        "--prompt-len",
        "8",
        "--max-tokens",
        "4",
        "--dtype",
        "float32",
        "--repeats",
        "1",
        "--out",
        str(tmp_path),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "profile.json").read_text())
    assert report["batch_sizes"] == [1, 4] and set(report["by_batch_size"]) == {"1", "4"}
    rows = {r["name"]: r for r in report["results"]}
    assert all(r["batch_size"] == 4 for r in rows.values())
    small = {r["name"]: r for r in report["by_batch_size"]["1"]}
    assert set(small) == set(rows) and all(r["batch_size"] == 1 and r["decode_tok_s"] > 0 for r in small.values())
    # ratios are computed from the runs measured in this process (one paired round: run / its base run)
    for table in (rows, small):
        base_runs = table["base"]["runs"]
        others = [name for name in table if name != "base"]
        for k, name in enumerate(others):
            assert table[name]["ratio_to_base"] == pytest.approx(table[name]["runs"][0] / base_runs[k])
    mem = report["memory_bytes"]
    assert mem["base"]["adapters"] == 0 and mem["base"]["base_weights"] > 0
    assert mem["mixed"]["adapters"] > mem["ia3"]["adapters"] > 0  # (IA)3 vectors are the smallest adapters
    assert mem["base"]["base_weights"] == mem["mixed"]["base_weights"]
    assert 0 < mem["base"]["kv_cache_workload"] <= mem["base"]["kv_cache_allocated"]
    md = (tmp_path / "profile.md").read_text()
    assert "## 1 concurrent request" in md and "## 4 concurrent requests" in md and "## Memory" in md
    png = (tmp_path / "profile.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert {"base", "merged", "unmerged-1", "lora-r16-attn", "lora-r8-all", "ia3", "prefix", "krona", "mixed"} <= set(
        rows
    )
    assert {"lora-r16-attn-one", "ia3-one", "prefix-one", "krona-one"} <= set(rows)  # one adapter per kind
    assert "one ia3 adapter unmerged, all requests" in res.stdout
    assert rows["base"]["ratio_to_base"] == 1.0
    for r in rows.values():
        assert r["decode_tok_s"] > 0 and r["ratio_to_base"] > 0
    # every configuration's run was paired with a base run measured in the same process
    assert len(rows["base"]["runs"]) == len(rows) - 1
    assert "| base model only |" in res.stdout
    assert report["peft_mixed_batch"]["peft_tok_s"] > 0 and "PEFT generate(adapter_names=...)" in res.stdout


def test_lora_ranks_make_attention_and_all_linear_families() -> None:
    from switchboard.bench.profile import adapter_families, kind_families

    families = adapter_families([4, 32])
    assert [f for f in families if f.startswith("lora")] == [
        "lora-r4-attn",
        "lora-r4-all",
        "lora-r32-attn",
        "lora-r32-all",
    ]
    assert families["lora-r32-all"].r == 32 and families["lora-r32-all"].lora_alpha == 64
    assert {"krona", "ia3", "prefix"} <= set(families)
    assert kind_families([4, 32])["lora"] == "lora-r4-attn" and kind_families([8, 16])["lora"] == "lora-r16-attn"
