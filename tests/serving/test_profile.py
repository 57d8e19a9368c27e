"""`switchboard profile` end to end on the tiny model: every configuration measured, ratios from the same run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


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
        "--num-requests",
        "4",
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
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "profile.json").read_text())
    rows = {r["name"]: r for r in report["results"]}
    assert {"base", "merged", "unmerged-1", "lora-r16-attn", "lora-r8-all", "ia3", "prefix", "krona", "mixed"} <= set(
        rows
    )
    assert rows["base"]["ratio_to_base"] == 1.0
    for r in rows.values():
        assert r["decode_tok_s"] > 0 and r["ratio_to_base"] > 0
    # every configuration's run was paired with a base run measured in the same process
    assert len(rows["base"]["runs"]) == len(rows) - 1
    assert "| base model only |" in res.stdout
    assert report["peft_mixed_batch"]["peft_tok_s"] > 0 and "PEFT generate(adapter_names=...)" in res.stdout
