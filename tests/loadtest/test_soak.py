"""`switchboard soak`, short: against the tiny model and one adapter of each kind it passes with the kill -9 and the
restart, counts hostile requests as refused and checks the uploads; a server that refuses good uploads fails it.
The verdict's rules are tested on plain records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from switchboard.loadtest.soak_report import Outcome, Result, RssSample, counts, rss_growth, verdict

KINDS = {"lora": "lora", "krona": "lokr-full", "ia3": "ia3", "prefix": "prefix"}  # kind -> the peft_adapters fixture
FLAGS = ["--serve-arg=--dtype=float32", "--serve-arg=--max-model-len=256", "--serve-arg=--num-threads=1"]


def _soak(tmp_path: Path, model: Path, adapters: dict[str, Path], *args: str) -> tuple[int, str, dict]:
    """The soak run in `tmp_path` with a relative --out (as `make soak` passes it), and its summary."""
    cmd = [str(Path(sys.executable).with_name("switchboard")), "soak", "--model", str(model), "--out", "soak"]
    for kind, name in KINDS.items():
        cmd += ["--adapter", f"demo-{kind}={adapters[name]}"]
    done = subprocess.run([*cmd, *FLAGS, *args], capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)
    summary = json.loads((tmp_path / "soak" / "soak.json").read_text())
    return done.returncode, done.stdout + done.stderr, summary


@pytest.mark.slow
def test_a_short_soak_with_a_kill_passes(tmp_path: Path, tiny_model_dir: Path, peft_adapters: dict[str, Path]) -> None:
    rc, out, summary = _soak(
        tmp_path, tiny_model_dir, peft_adapters, "--duration", "40", "--concurrency", "4", "--progress-every", "10",
        "--warmup", "0.2", "--rss-limit", "0.5",  # a 40 s run has no plateau yet: this catches gross growth only
    )  # fmt: skip
    assert rc == 0, out[-5000:]
    c = summary["counts"]
    assert c["failed"] == c["collateral"] == c["hostile_not_refused"] == 0
    assert c["completed"] > 20 and c["refused"] > 5
    assert summary["kill"] is not None and summary["kill"]["at_s"] == pytest.approx(20, abs=3)
    assert [check["when"] for check in summary["uploads"]] == ["after the restart", "at the end"]
    for check in summary["uploads"]:
        assert check["acknowledged"] >= 3 and not (check["lost"] or check["altered"] or check["unexpected"])
    assert summary["uploads"][-1]["unusable"] == []
    assert any(key.startswith("hostile: ") for key in summary["by_case"])
    assert summary["rss"]["by_server"][0]["growth"] is not None
    assert "[soak] PASS" in out and out.count("s: completed") >= 3  # progress lines
    assert (tmp_path / "soak" / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_server_refusing_good_uploads_fails_the_soak(
    tmp_path: Path, tiny_model_dir: Path, peft_adapters: dict[str, Path]
) -> None:
    """An upload limit below every good upload (the last --max-adapter-bytes wins): each upload is collateral."""
    rc, out, summary = _soak(
        tmp_path, tiny_model_dir, peft_adapters, "--duration", "6", "--no-kill", "--serve-arg=--max-adapter-bytes=1000"
    )
    assert rc == 1, out[-3000:]
    assert summary["counts"]["collateral"] >= 3  # the three tenants' first uploads
    assert summary["verdict"]["reasons"][0].endswith("failed outside the kill (collateral)")
    assert "[soak] FAIL" in out and "413" in out


def _result(action: str, outcome: Outcome, start: float = 0.0) -> Result:
    return Result(action, "case", "alice", start, start + 1, outcome)


def test_the_verdict_counts_collateral_and_hostile_failures_apart_from_the_kill() -> None:
    results = [
        _result("generate", Outcome.COMPLETED),
        _result("generate", Outcome.KILLED),
        _result("hostile", Outcome.REFUSED),
        _result("hostile", Outcome.KILLED),
        _result("cancel", Outcome.CANCELLED),
    ]
    assert verdict(counts(results), [], [], 0.1, []) == []
    tally = counts([*results, _result("generate", Outcome.FAILED), _result("bad-upload", Outcome.FAILED)])
    assert (tally["failed"], tally["collateral"], tally["hostile_not_refused"], tally["killed"]) == (2, 1, 1, 2)
    assert len(verdict(tally, [], [], 0.1, [])) == 2


def test_the_verdict_fails_on_lost_uploads_and_rss_growth() -> None:
    uploads = [{"when": "at the end", "lost": ["alice/x"], "altered": [], "unexpected": []}]
    rss = [{"pid": 1, "growth": 0.2}, {"pid": 2, "growth": None}, {"pid": 3, "growth": 0.05}]
    reasons = verdict(counts([]), uploads, rss, 0.1, ["the kill and restart did not happen"])
    assert reasons == [
        "at the end: 1 acknowledged upload(s) lost",
        "server pid 1: RSS grew +20.0% after warm-up (limit 10%)",
        "the kill and restart did not happen",
    ]


def test_rss_growth_is_measured_per_process_after_its_warm_up() -> None:
    mib = 2**20
    first = [RssSample(t, 10, (100 if t < 10 else 200 + t) * mib) for t in range(40)]  # warm-up ends at 10 s
    short = [RssSample(40 + t, 11, (300 + t) * mib) for t in range(14)]  # 4 samples after its warm-up
    gone = [RssSample(60 + t, 12, 300 * mib) for t in range(11)]  # 1 sample after its warm-up: not measured
    rows = rss_growth(first + short + gone, warmup_s=10, window=5)
    assert rows[0]["baseline_mib"] == 212 and rows[0]["end_mib"] == 237
    assert rows[0]["growth"] == pytest.approx(237 / 212 - 1)
    assert rows[1]["baseline_mib"] == 310.5 and rows[1]["end_mib"] == 312.5  # two samples each
    assert rows[2]["pid"] == 12 and rows[2]["growth"] is None
