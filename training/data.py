"""Training data: JSONL rows `{"prompt", "completion"}` or `{"messages": [...]}`, tokenised with the loss mask.

Every problem names the file and line, so a user fixes the data, not the code. A messages row trains on its last
message, which must be the assistant's; the rest is rendered with the tokenizer's chat template as the prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

IGNORE = -100  # label of a token that carries no loss (prompt and padding)


class DataError(ValueError):
    """The data file is malformed; the message names the file and the line."""


@dataclass(frozen=True, slots=True)
class Row:
    line: int
    prompt: str
    completion: str
    chat: bool  # rendered with the chat template: the completion already ends with the template's end of turn


@dataclass(frozen=True, slots=True)
class Example:
    input_ids: list[int]
    num_prompt: int  # the first num_prompt tokens carry no loss

    @property
    def num_completion(self) -> int:
        return len(self.input_ids) - self.num_prompt


def _text(value: object, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _messages_row(messages: object, where: str) -> tuple[list[dict[str, str]], str]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: messages[{i}] needs 'role' and 'content'")
        clean.append({"role": _text(m["role"], where, "role"), "content": _text(m["content"], where, "content")})
    if clean[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's (it is what the adapter learns)")
    return clean, clean[-1]["content"]


def read_rows(path: Path, tokenizer: PreTrainedTokenizerBase) -> list[Row]:
    """Parse and check every line (blank lines are skipped); raises DataError naming the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    rows: list[Row] = []
    with path.open(encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if "messages" in obj:
                messages, answer = _messages_row(obj["messages"], where)
                if tokenizer.chat_template is None:
                    raise DataError(f"{where}: a messages row needs a tokenizer with a chat template")
                prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
                full = tokenizer.apply_chat_template(messages, tokenize=False)
                if not full.startswith(prompt) or answer not in full[len(prompt) :]:
                    raise DataError(f"{where}: the chat template does not render the answer after the prompt")
                rows.append(Row(number, prompt, full[len(prompt) :], chat=True))
                continue
            missing = [k for k in ("prompt", "completion") if k not in obj]
            if missing:
                raise DataError(f"{where}: missing field {missing[0]!r} (rows are {{prompt, completion}} or messages)")
            prompt, completion = _text(obj["prompt"], where, "prompt"), _text(obj["completion"], where, "completion")
            if not completion:
                raise DataError(f"{where}: field 'completion' is empty")
            rows.append(Row(number, prompt, completion, chat=False))
    if not rows:
        raise DataError(f"{path}: the data file has no rows")
    return rows


def tokenize(rows: list[Row], tokenizer: PreTrainedTokenizerBase, max_length: int, path: Path) -> list[Example]:
    """Prompt tokens (with the tokenizer's BOS) followed by completion tokens and EOS; loss on the latter only."""
    out = []
    bos = tokenizer.bos_token
    for row in rows:
        special = not (bos and row.prompt.startswith(bos))  # a chat template may write BOS itself
        prompt = tokenizer(row.prompt, add_special_tokens=special)["input_ids"]
        completion = tokenizer(row.completion, add_special_tokens=False)["input_ids"]
        if not row.chat and tokenizer.eos_token_id is not None:
            completion = [*completion, tokenizer.eos_token_id]
        if len(prompt) >= max_length:
            raise DataError(f"{path}:{row.line}: the prompt has {len(prompt)} tokens; --max-length is {max_length}")
        ids = (prompt + completion)[:max_length]
        out.append(Example(ids, len(prompt)))
    return out


def split(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded held-out split: at least one example on each side."""
    if len(examples) < 2:
        raise DataError(f"need at least 2 rows for a held-out split, got {len(examples)}")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * eval_fraction)))
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


@dataclass(slots=True)
class Batch:
    input_ids: torch.Tensor  # [B, L], right-padded
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L]: IGNORE on prompt and padding
    num_tokens: int  # real tokens (prompt and completion)
    num_loss_tokens: int  # tokens that carry loss (targets after the shift)


def collate(examples: list[Example], pad_id: int) -> Batch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, e.num_prompt : n] = ids[i, e.num_prompt : n]
    return Batch(ids, mask, labels, int(mask.sum()), int((labels[:, 1:] != IGNORE).sum()))
