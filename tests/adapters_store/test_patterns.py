"""Regular expressions in adapter configs: matched by RE2 in linear time with PEFT's meaning (PEFT's own
`get_pattern_key` and `match_target_against_key` are the oracle), and refused, naming the field and the pattern,
where RE2 cannot run them or they pass the limits."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from peft import IA3Config, LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key, match_target_against_key
from transformers import LlamaForCausalLM

from switchboard.adapters_store.kinds import AdapterError, BaseModelShape, LoraAdapter, load_adapter
from switchboard.adapters_store.kinds import patterns as patterns_module
from switchboard.adapters_store.kinds.base import TARGET_MODULES, module_key
from switchboard.adapters_store.kinds.patterns import MAX_PATTERN_CHARS, MAX_PATTERNS, ConfigPatterns
from switchboard.adapters_store.kinds.targets import targeted_modules

CONFIG = "adapter_config.json"
# The issue's upload: Python's engine backtracks over every way to split the name between the two `+`, about 6 s for
# each attention module name of the tiny model.
ISSUE_PATTERN = r"model\.([\w.]+)+!"
# rank_pattern keys, as PEFT embeds them in `(.*\.)?(p)$`: plain names, classes, flags, alternation that escapes
# PEFT's group, newlines, and spellings that Python and RE2 read differently when given the text as is (`x{,2}`, a
# POSIX class, octal and hex escapes, Python's `\Z`, `\s` on \v, the Kelvin sign under IGNORECASE).
KEY_PATTERNS = [
    "q_proj",
    "v_proj",
    "proj",
    "",
    r"layers\.1\.mlp\.down_proj",
    "self_attn.*",
    r".*\.0\..*",
    "mlp",
    "(?i:Q_PROJ)",
    "(?i:\u212a)_proj",
    r"[qkv]_proj",
    r"[^\W\d]_proj",
    r"\w+_proj",
    "o_proj|gate_proj",
    "q_proj)|(.*",
    r"\d",
    r"layers\.\d+\.self_attn\.[a-z]_proj",
    "q_proj\n",
    "q_proj$\n",
    "(?m:q_proj$)",
    "(?s:.)*q_proj",
    r"\bq_proj",
    r"\Bproj",
    r"q_proj\Z",
    r"x{,2}q_proj",
    r"x{,}_proj",
    "[[:alpha:]]_proj",
    r"\x71_proj",
    r"\161_proj",
    r"\s*q_proj",
    r"[\s\x0b]?k_proj",
    r".{1,3}_proj",
    r"(?:q|k)_proj{1,2}",
    r"(?P<name>up)_proj",
    r"(down)?_proj",
    "lm_head",
    r"embed_tokens|norm",
]
# target_modules / exclude_modules / feedforward_modules strings, matched whole.
FULL_PATTERNS = [
    r".*\.(q|v)_proj",
    r".*q_proj",
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.q_proj\n",
    "(?x) .* \\. q_proj  # verbose",
    "(?i).*Q_PROJ",
    ".*(?i:\u212a)_proj",
    "(?s).*",
    "",
    r"model\.layers\.[01]\..*",
    "lm_head",
    r".*\Z",
    r".*(?:self_attn|mlp)\.\w{1,2}_proj",
    r"model(\.\w+)*",
]
LOOKAROUND = r"model\.layers\.\d+\.mlp\..*(?<!x)"


def module_names(model: LlamaForCausalLM) -> list[str]:
    """Every named module of the tiny model, as PEFT walks them (projections and everything else)."""
    return [name for name, _ in model.named_modules() if name]


@pytest.fixture(scope="module")
def lora_dir(make_peft) -> Path:
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2}, init_lora_weights=False
    )
    return make_peft(config, "lora-ranks")[1]


@pytest.fixture(scope="module")
def ia3_dir(make_peft) -> Path:
    config = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    return make_peft(config, "ia3-feedforward")[1]


@pytest.fixture
def edited(tmp_path: Path) -> Callable[..., Path]:
    """A copy of an adapter directory with fields of its config replaced."""
    copies = itertools.count()

    def edit(source: Path, **fields: object) -> Path:
        out = tmp_path / f"adapter-{next(copies)}"
        shutil.copytree(source, out)
        config = json.loads((out / CONFIG).read_text())
        config.update(fields)
        (out / CONFIG).write_text(json.dumps(config))
        return out

    return edit


@pytest.mark.parametrize(
    "rank_pattern",
    [{ISSUE_PATTERN: 8, "q_proj": 2}, {r"model\.([\w.]+)+q_proj": 2}],
    ids=["the issue's pattern, matching nothing", "a pathological pattern matching q_proj"],
)
def test_a_backtracking_pattern_is_matched_in_linear_time(
    lora_dir: Path, edited, base_shape: BaseModelShape, rank_pattern: dict[str, int]
) -> None:
    path = edited(lora_dir, rank_pattern=rank_pattern)
    started = time.monotonic()
    adapter = load_adapter(path, base_shape)
    elapsed = time.monotonic() - started
    assert isinstance(adapter, LoraAdapter)
    ranks = {key: a.shape[0] for key, (a, _) in adapter.weights.items()}
    assert ranks == {(0, "q_proj"): 2, (0, "v_proj"): 4, (1, "q_proj"): 2, (1, "v_proj"): 4}
    assert elapsed < 1.0, f"took {elapsed:.2f} s"  # Python's engine: seconds for each q_proj or v_proj name


def test_rank_pattern_keys_pick_what_peft_picks(tiny_llama: LlamaForCausalLM) -> None:
    """Each pattern alone, and all in order (the first match wins), on every module name of the tiny model."""
    names = module_names(tiny_llama)
    tables = [{pattern: 1} for pattern in KEY_PATTERNS] + [{p: i for i, p in enumerate(KEY_PATTERNS)}]
    for table in tables:
        ours = ConfigPatterns({"rank_pattern": table})
        for name in names:
            theirs = table.get(get_pattern_key(list(table), name), -1)
            assert ours.value("rank_pattern", name, -1) == theirs, (table if len(table) == 1 else "all", name)


def test_whole_name_patterns_match_what_peft_matches(tiny_llama: LlamaForCausalLM) -> None:
    for pattern in FULL_PATTERNS:
        ours = ConfigPatterns({"target_modules": pattern})
        for name in module_names(tiny_llama):
            theirs = match_target_against_key(pattern, name) is not None
            assert ours.fullmatch("target_modules", name) == theirs, (pattern, name)


@pytest.mark.parametrize(
    ("field", "pattern", "why"),
    [
        ("rank_pattern", r"(q)\1_proj", "backreferences"),
        ("alpha_pattern", r"(?P<p>q)(?P=p)", "backreferences"),
        ("rank_pattern", r"q_proj(?=x)", "lookahead"),
        ("target_modules", LOOKAROUND, "lookbehind"),
        ("exclude_modules", r"(?!model\.layers\.0).*", "lookahead"),
        ("rank_pattern", r"(?>.*)q_proj", "atomic groups"),
        ("alpha_pattern", r".*+q_proj", "possessive repeats"),
        ("rank_pattern", r"(q)?(?(1)_proj|x)", "conditional backreferences"),
        ("rank_pattern", r"q{1001}", "invalid repetition size"),
        ("rank_pattern", "(?i:\u0131)_proj", "fold them differently"),
        ("rank_pattern", "(q_proj", "not a valid regular expression"),
        ("target_modules", "[", "not a valid regular expression"),
        ("rank_pattern", "x" * (MAX_PATTERN_CHARS + 1), f"at most {MAX_PATTERN_CHARS}"),
    ],
)
def test_a_pattern_re2_cannot_run_is_refused_naming_the_field(
    lora_dir: Path, edited, base_shape: BaseModelShape, field: str, pattern: str, why: str
) -> None:
    value = pattern if field in ("target_modules", "exclude_modules") else {pattern: 4}
    with pytest.raises(AdapterError) as caught:
        load_adapter(edited(lora_dir, **{field: value}), base_shape)
    message = str(caught.value)
    assert message.startswith(f"{CONFIG}: {field} pattern {repr(pattern)[:40]}"), message
    assert why in message, message


def test_a_feedforward_pattern_re2_cannot_run_is_refused(ia3_dir: Path, edited, base_shape: BaseModelShape) -> None:
    lookbehind = r".*(?<=mlp\.)down_proj"
    with pytest.raises(AdapterError, match=re.escape(f"{CONFIG}: feedforward_modules pattern {lookbehind!r}")):
        load_adapter(edited(ia3_dir, feedforward_modules=lookbehind), base_shape)
    regex = edited(ia3_dir, feedforward_modules=r".*\.mlp\.down_proj")
    assert load_adapter(regex, base_shape).vectors[(0, "down_proj")][1] == "input"


def test_patterns_up_to_the_limits_are_accepted(lora_dir: Path, edited, base_shape: BaseModelShape) -> None:
    longest = "q_proj" + "|x" * ((MAX_PATTERN_CHARS - len("q_proj")) // 2)
    many = {f"x{i}": 8 for i in range(MAX_PATTERNS - 1)} | {longest: 2}
    assert len(longest) == MAX_PATTERN_CHARS and len(many) == MAX_PATTERNS
    adapter = load_adapter(edited(lora_dir, rank_pattern=many), base_shape)
    assert isinstance(adapter, LoraAdapter) and adapter.weights[(1, "q_proj")][0].shape[0] == 2


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"rank_pattern": {f"x{i}": 8 for i in range(MAX_PATTERNS + 1)}}, "rank_pattern has 1001 patterns"),
        ({"target_modules": ["q_proj", "v_proj"] * (MAX_PATTERNS // 2 + 1)}, "target_modules lists 1002 names"),
        ({"alpha_pattern": ["q_proj"]}, "alpha_pattern must be an object"),
        ({"exclude_modules": {"q_proj": 1}}, "exclude_modules must be a list of names or a regex"),
    ],
)
def test_too_many_patterns_are_refused(lora_dir: Path, edited, base_shape: BaseModelShape, fields, fragment) -> None:
    with pytest.raises(AdapterError, match=fragment):
        load_adapter(edited(lora_dir, **fields), base_shape)


def test_matching_past_the_budget_is_refused(
    lora_dir: Path, edited, base_shape: BaseModelShape, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within the limits, matching is linear but can still add up (thousands of patterns times module names): one
    upload's patterns get PATTERN_BUDGET_S in all. A budget of 0 makes any pattern work overrun it."""
    assert ConfigPatterns({"rank_pattern": {"q_proj": 2}}).value("rank_pattern", "a.q_proj", 4) == 2
    with pytest.raises(AdapterError, match=r"rank_pattern .* took 0 s or more; use fewer or simpler patterns"):
        ConfigPatterns({"rank_pattern": {"q_proj": 2}}, budget_s=0.0).value("rank_pattern", "a.q_proj", 4)
    monkeypatch.setattr(patterns_module, "PATTERN_BUDGET_S", 0.0)
    with pytest.raises(AdapterError, match=f"{CONFIG}: compiling and matching rank_pattern .* took 0 s or more"):
        load_adapter(lora_dir, base_shape)


# layers_pattern values as PEFT embeds them in `(?:^|.*?\.)p\.(?P<idx>\d+)\.`, including alternation that leaves `idx`
# unset, patterns that find no index, and PEFT's empty forms (the default rule).
LAYER_PATTERNS: list[str | list[str] | None] = [
    None,
    "",
    [],
    "layers",
    ["layers"],
    "h",
    ["h", "layers"],
    "lay.rs",
    "layers|h",
    "h|layers",
    "model|layers",
    r"model\.layers",
    "model",
    r"(?:model\.)?layers",
    r"layers\.1",
    r"\w+",
    ".*",
    "(?i:LAYERS)",
]


@pytest.mark.parametrize("layers", [[1], [0, 11], 1, [3, 10, 11], []])
def test_layers_pattern_selects_the_layers_peft_selects(layers: int | list[int]) -> None:
    """PEFT's own check_target_module_exists is the oracle, on a 12-layer base so that indices have two digits."""
    base = BaseModelShape(
        num_layers=12, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16
    )
    for layers_pattern in LAYER_PATTERNS:
        config = {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": layers}
        config["layers_pattern"] = layers_pattern
        peft_config = LoraConfig(**config)
        theirs = {
            (layer, module)
            for layer in range(base.num_layers)
            for module in TARGET_MODULES
            if check_target_module_exists(peft_config, module_key(layer, module))
        }
        assert targeted_modules(ConfigPatterns(config), base) == theirs, layers_pattern


def test_a_layers_pattern_re2_cannot_run_is_refused(lora_dir: Path, edited, base_shape: BaseModelShape) -> None:
    backreference = r"(lay)\1ers"
    path = edited(lora_dir, layers_to_transform=[0, 1], layers_pattern=backreference)
    with pytest.raises(AdapterError, match=re.escape(f"{CONFIG}: layers_pattern pattern {backreference!r}")):
        load_adapter(path, base_shape)
