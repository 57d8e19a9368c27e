"""What every adapter kind shares: the `Adapter` protocol, the base-model shape it is validated against, the error
it raises, and the readers for a PEFT directory (`adapter_config.json` + `adapter_model.safetensors`).

A PEFT directory is untrusted input (users upload it). Everything here refuses rather than guesses: only the
safetensors file is ever read (never a pickle, never `torch.load`), tensor names and shapes are checked from the
safetensors header before any tensor is loaded, and every loaded value must be finite. Once a kind has folded its
config's scales in, what it will serve must also stay within `MAX_SERVED_MAGNITUDE` (`check_served`, `check_probe`).
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20
# Files a PEFT directory may hold that are pickles (torch.save / pickle.dump). They are named, never opened.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# The largest |value| served: every folded tensor element, and every element of an adapter's update of a unit-norm
# probe input. Trained adapters stay orders of magnitude below it (folded LoRA/KronA factors and (IA)3 scales are
# O(1e-3..10), prefix keys and values O(10)), while 1e4 times an O(1) activation stays well inside fp16's 65504 (and
# bf16's float32 range): a `lora_alpha` of 1e300 or an (IA)3 scale of 3e38 is finite in the file but not once served.
MAX_SERVED_MAGNITUDE = 1e4
PROBE_SEED = 0

# Llama-family projection -> the block attribute that holds it (`model.layers.{i}.{parent}.{module}`)
TARGET_MODULES: dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
ALL_LINEAR: tuple[str, ...] = tuple(TARGET_MODULES)  # every projection, in the block's order
ATTENTION: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
# PEFT saves a causal LM's adapter tensors as `base_model.model.` + the base model's own parameter name.
KEY_PREFIX = "base_model.model."
_MODULE_KEY = re.compile(r"model\.layers\.(0|[1-9][0-9]*)\.(self_attn|mlp)\.([a-z_]+)\.(.+)")


class AdapterKind(enum.StrEnum):
    LORA = "lora"
    KRONA = "krona"
    IA3 = "ia3"
    PREFIX = "prefix"


class AdapterError(ValueError):
    """Malformed or incompatible adapter; the message names the file and the problem."""

    def __init__(self, problem: str, file: str | None = None) -> None:
        self.problem = problem
        self.file = file
        super().__init__(f"{file}: {problem}" if file else problem)


@dataclass(frozen=True, slots=True)
class BaseModelShape:
    """What validation needs from the base model."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"BaseModelShape.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) is not a multiple of num_kv_heads ({self.num_kv_heads})")

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_shape(self, module: str) -> tuple[int, int]:
        """(out, in) of a projection in nn.Linear layout."""
        q, kv, h, ff = self.num_heads * self.head_dim, self.kv_dim, self.hidden_size, self.intermediate_size
        shapes = {
            "q_proj": (q, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, q),
            "gate_proj": (ff, h),
            "up_proj": (ff, h),
            "down_proj": (h, ff),
        }
        if module not in shapes:
            raise AdapterError(f"unknown target module {module!r}; known: {', '.join(shapes)}")
        return shapes[module]

    @classmethod
    def from_hf_config(cls, raw: dict[str, Any]) -> BaseModelShape:
        """From a Hugging Face `config.json` dict (Llama, Mistral, Qwen2)."""
        num_heads = raw["num_attention_heads"]
        return cls(
            num_layers=raw["num_hidden_layers"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
        )


class Adapter(Protocol):
    """One loaded, validated adapter: float32 CPU tensors with scales already folded in."""

    # Read-only attributes (properties here, so that frozen dataclasses satisfy the protocol).
    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> AdapterKind: ...

    @property
    def path(self) -> Path: ...

    @property
    def num_parameters(self) -> int:
        """Elements stored in the file (decomposed factors counted as stored, not multiplied out)."""
        ...

    @property
    def rank(self) -> int:
        """LoRA: the largest r; KronA: the largest bound on rank(delta); (IA)3: 0; prefix: virtual tokens."""
        ...

    @property
    def merge_exact(self) -> bool:
        """False for (IA)3 (unmerge divides) and prefix (cannot merge at all)."""
        ...

    def modules(self) -> list[tuple[int, str]]:
        """(layer index, module name) pairs whose weights the adapter changes, sorted."""
        ...

    def delta(self, layer: int, module: str) -> torch.Tensor:
        """Dense float32 delta in nn.Linear layout [out, in] (LoRA, KronA); for tests and merging only."""
        ...

    def probe(self, layer: int, module: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter's update of a unit-norm input `x` [in], float32, without the base weight (for validation):
        LoRA and KronA `delta(layer, module) @ x` [out] from the factors; (IA)3 the scaling applied to a unit-scale
        activation (`x * l` on the input side, `l` on the output side)."""
        ...

    def merge(self, weight: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        """The merged weight (same dtype as `weight`), computed in float32."""
        ...

    def unmerge(self, weight: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        """Undo `merge` (exactly up to rounding when `merge_exact`)."""
        ...

    def merge_bias(self, bias: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        """The module's bias after merging (additive deltas leave it; (IA)3 output scaling scales it)."""
        ...


# ---- reading a PEFT directory -------------------------------------------------------------------------------


def adapter_files(path: Path) -> tuple[Path, Path]:
    """The config and weights files of a PEFT directory, refusing pickle-only directories."""
    if not path.is_dir():
        raise AdapterError("not a directory", str(path))
    config, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config.is_file():
        raise AdapterError("missing (a PEFT adapter directory needs adapter_config.json)", CONFIG_FILE)
    if not weights.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise AdapterError(
                f"missing; found only {', '.join(pickles)}: pickle files are never loaded, "
                f"re-save the adapter with safetensors (save_pretrained(..., safe_serialization=True))",
                WEIGHTS_FILE,
            )
        raise AdapterError("missing", WEIGHTS_FILE)
    return config, weights


def read_config(file: Path) -> dict[str, Any]:
    """`adapter_config.json` as a dict: UTF-8 JSON holding one object."""
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterError(f"larger than {MAX_CONFIG_BYTES} bytes", file.name)
    try:
        raw = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise AdapterError(f"not UTF-8 ({exc.reason} at byte {exc.start})", file.name) from exc
    except json.JSONDecodeError as exc:
        raise AdapterError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})", file.name) from exc
    except RecursionError as exc:
        raise AdapterError("JSON nested too deeply", file.name) from exc
    if not isinstance(raw, dict):
        raise AdapterError(f"must hold a JSON object, got {type(raw).__name__}", file.name)
    return raw


class WeightsFile:
    """An open safetensors file: the header (names, dtypes, shapes) first, tensors on request."""

    def __init__(self, file: Path, handle: Any) -> None:
        self.file = file
        self._handle = handle
        self.shapes: dict[str, tuple[int, ...]] = {}
        names: list[str] = handle.keys()  # safe_open handles are not iterable
        for key in names:
            meta = handle.get_slice(key)
            if meta.get_dtype() not in FLOAT_DTYPES:
                raise self.error(f"tensor {key!r} has dtype {meta.get_dtype()}; expected one of {FLOAT_DTYPES}")
            self.shapes[key] = tuple(meta.get_shape())
        if not self.shapes:
            raise self.error("holds no tensors")

    def error(self, problem: str) -> AdapterError:
        return AdapterError(problem, self.file.name)

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor as contiguous float32 on the CPU; refuses NaN or Inf."""
        try:
            value = self._handle.get_tensor(key)
        except SafetensorError as exc:
            raise self.error(f"cannot read tensor {key!r}: {exc}") from exc
        value = value.to(torch.float32).contiguous()
        if not torch.isfinite(value).all():
            raise self.error(f"tensor {key!r} holds NaN or Inf values")
        return value


def check_served(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """`tensor` (its scale folded in) as it will be served: finite and within MAX_SERVED_MAGNITUDE, else refused."""
    peak = tensor.abs().max().item() if tensor.numel() else 0.0
    if not peak <= MAX_SERVED_MAGNITUDE:  # also NaN
        raise AdapterError(
            f"{what} reaches |value| {peak:.4g} as served; served values must be finite and at most "
            f"{MAX_SERVED_MAGNITUDE:g}",
            WEIGHTS_FILE,
        )
    return tensor


def check_probe(adapter: Adapter, base: BaseModelShape) -> None:
    """Apply the adapter's update to a fixed random unit-norm input per target module and refuse an output that is
    not finite or above MAX_SERVED_MAGNITUDE: factors within the bound one by one can still multiply past it."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    for layer, module in adapter.modules():
        x = torch.randn(base.module_shape(module)[1], generator=generator)
        check_served(adapter.probe(layer, module, x / x.norm()), f"layer {layer} {module}: the update of a probe input")


@contextmanager
def open_weights(file: Path) -> Iterator[WeightsFile]:
    try:
        handle_cm = safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"not a valid safetensors file ({exc})", file.name) from exc
    with handle_cm as handle:
        yield WeightsFile(file, handle)


def parse_key(key: str, file: Path, base: BaseModelShape) -> tuple[int, str, str]:
    """`base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.{leaf}` -> (i, module, leaf), validated."""
    match = _MODULE_KEY.fullmatch(key.removeprefix(KEY_PREFIX)) if key.startswith(KEY_PREFIX) else None
    if match is None:
        raise AdapterError(
            f"tensor {key!r} does not name a target module "
            f"(expected {KEY_PREFIX}model.layers.<i>.<self_attn|mlp>.<module>.<tensor>)",
            file.name,
        )
    layer, parent, module, leaf = int(match[1]), match[2], match[3], match[4]
    if TARGET_MODULES.get(module) != parent:
        raise AdapterError(
            f"tensor {key!r} targets unknown module {parent}.{module}; supported: "
            + ", ".join(f"{p}.{m}" for m, p in TARGET_MODULES.items()),
            file.name,
        )
    if layer >= base.num_layers:
        raise AdapterError(f"tensor {key!r} targets layer {layer}; the base model has {base.num_layers}", file.name)
    return layer, module, leaf


def module_key(layer: int, module: str) -> str:
    """The module's name inside the base model, as PEFT matches `rank_pattern` and friends against it."""
    return f"model.layers.{layer}.{TARGET_MODULES[module]}.{module}"


def group_keys(
    weights: WeightsFile,
    base: BaseModelShape,
    leaves: tuple[str, ...],
    refused: dict[str, str] | None = None,
) -> dict[tuple[int, str], dict[str, str]]:
    """Tensor keys grouped by (layer, module) -> {leaf: key}, sorted; refuses leaves outside `leaves`, with the
    reason from `refused` (leaf -> why) where one is given."""
    groups: dict[tuple[int, str], dict[str, str]] = {}
    for key in weights.shapes:
        layer, module, leaf = parse_key(key, weights.file, base)
        for name, why in (refused or {}).items():
            if leaf == name or leaf.startswith(f"{name}."):
                raise weights.error(f"tensor {key!r}: {why}")
        if leaf not in leaves:
            raise weights.error(f"tensor {key!r}: unexpected tensor {leaf!r}; expected one of {', '.join(leaves)}")
        groups.setdefault((layer, module), {})[leaf] = key
    return dict(sorted(groups.items()))


def matrix_shape(weights: WeightsFile, key: str) -> tuple[int, int]:
    """The shape of a tensor that must be a non-empty matrix."""
    shape = weights.shapes[key]
    if len(shape) != 2 or 0 in shape:
        raise weights.error(f"tensor {key!r} has shape {list(shape)}, expected a non-empty matrix")
    return shape[0], shape[1]


def check_shape(weights: WeightsFile, key: str, expected: tuple[int, ...]) -> None:
    if weights.shapes[key] != expected:
        raise weights.error(f"tensor {key!r} has shape {list(weights.shapes[key])}, expected {list(expected)}")


# ---- config fields (all in adapter_config.json) ---------------------------------------------------------------


def config_int(config: dict[str, Any], field: str, *, default: int | None = None, minimum: int = 1) -> int:
    value = config.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise AdapterError(f"{field} must be an integer >= {minimum}, got {value!r}", CONFIG_FILE)
    return value


def config_number(config: dict[str, Any], field: str, *, default: float | None = None) -> float:
    value = config.get(field, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise AdapterError(f"{field} must be a finite number, got {value!r}", CONFIG_FILE)
    return float(value)


def config_bool(config: dict[str, Any], field: str, *, default: bool = False) -> bool:
    value = config.get(field, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise AdapterError(f"{field} must be true or false, got {value!r}", CONFIG_FILE)
    return value


def refuse_options(config: dict[str, Any], reasons: dict[str, str]) -> None:
    """Refuse every option in `reasons` (field -> why) that the config sets to anything but null, false or empty."""
    for field, reason in reasons.items():
        if config.get(field):
            raise AdapterError(f"{field}={config[field]!r} is not supported: {reason}", CONFIG_FILE)


def merge_additive(adapter: Adapter, weight: torch.Tensor, layer: int, module: str, sign: float) -> torch.Tensor:
    """Merge (sign 1) or unmerge (sign -1) an additive adapter's delta; an untouched module's weight as is."""
    if (layer, module) not in adapter.modules():
        return weight
    return add_delta(weight, adapter.delta(layer, module), sign, f"{adapter.name} layer {layer} {module}")


def add_delta(weight: torch.Tensor, delta: torch.Tensor, sign: float, what: str) -> torch.Tensor:
    """`weight + sign * delta` computed in float32, returned in `weight`'s dtype."""
    if tuple(weight.shape) != tuple(delta.shape):
        raise AdapterError(f"{what}: weight has shape {list(weight.shape)}, the adapter expects {list(delta.shape)}")
    return torch.add(weight.to(torch.float32), delta.to(weight.device), alpha=sign).to(weight.dtype)
