"""Malformed data stops `switchboard train` with a message naming the line, before any output is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from switchboard.serving.cli import main

GOOD = json.dumps({"prompt": "Hi", "completion": " there"})


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([GOOD, GOOD, '{"prompt": "Hi", "completion": '], ":3: not valid JSON"),
        ([GOOD, json.dumps({"prompt": "Hi"}), GOOD], ":2: missing field 'completion'"),
        ([GOOD, json.dumps({"prompt": "Hi", "completion": 5})], ":2: field 'completion' must be a string"),
        ([GOOD, json.dumps(["a", "b"])], ":2: expected a JSON object"),
        ([json.dumps({"messages": [{"role": "user", "content": "Hi"}]})], ":1: the last message must be the assistant"),
        ([], "the data file has no rows"),
        (["", "  "], "the data file has no rows"),
    ],
)
def test_malformed_data_names_the_line_and_writes_nothing(
    lines: list[str], message: str, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    out = tmp_path / "adapters" / "bad"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", str(tiny_model_dir), "--kind", "lora", "--data", str(data), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert str(data) in err
    assert not out.exists()
    assert not (tmp_path / "adapters").exists() or not any((tmp_path / "adapters").iterdir())


def test_chat_rows_train_on_the_assistant_answer(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from switchboard.training.data import read_rows, tokenize

    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy"}]}
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(row) + "\n", encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    [example] = tokenize(read_rows(data, tok), tok, 256, data)
    rendered = tok.apply_chat_template(row["messages"], tokenize=False)
    assert example.input_ids == tok(rendered)["input_ids"]  # what the server encodes for the same conversation
    assert tok.decode(example.input_ids[example.num_prompt :]) == "Ahoy</s>\n"


def test_train_command_prints_its_figures(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}", "completion": " A"}) + "\n" for i in range(20)))
    script = Path(sys.executable).with_name("switchboard")
    cmd = [str(script), "train", "--model", str(tiny_model_dir), "--kind", "ia3", "--data", str(data)]
    args = [*cmd, "--out", str(tmp_path / "ia3"), "--max-steps", "2"]
    done = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for needle in ("trainable parameters:", "peak memory:", "tokens/s", "held-out loss:"):
        assert needle in done.stdout
    assert "train ia3" in done.stderr  # the tqdm progress bar
    with pytest.raises(SystemExit):  # the same --out again: refused before training, the adapter kept
        main([*cmd[1:], "--out", str(tmp_path / "ia3")])
    assert (tmp_path / "ia3" / "adapter_model.safetensors").is_file()


def test_demo_tasks_parse_and_configure(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from switchboard.training.data import read_rows
    from switchboard.training.demo import DEMO_TASKS, demo_config

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    kinds = set()
    for name in DEMO_TASKS:
        cfg = demo_config(name, tiny_model_dir, tmp_path)
        assert cfg.out == tmp_path / name
        assert len(read_rows(cfg.data, tok)) >= 200  # the committed JSONL files are well-formed
        kinds.add(cfg.kind.value)
    assert kinds == {"lora", "krona", "ia3", "prefix"}
