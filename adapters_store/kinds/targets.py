"""Which projections an adapter config targets, decided as PEFT decides it (peft 0.21
`tuners_utils.check_target_module_exists`), and the check that the weights file holds tensors for exactly those."""

from __future__ import annotations

from typing import Any

from switchboard.adapters_store.kinds.base import (
    CONFIG_FILE,
    TARGET_MODULES,
    WEIGHTS_FILE,
    AdapterError,
    BaseModelShape,
    module_key,
)
from switchboard.adapters_store.kinds.patterns import ConfigPatterns

ALL_LINEAR = "all-linear"  # PEFT's shorthand (compared ignoring case) for every linear layer but the output head


def check_targets(patterns: ConfigPatterns, found: set[tuple[int, str]], base: BaseModelShape) -> None:
    """The modules the file holds tensors for (`found`) must be exactly those PEFT would adapt under the config
    (`targeted_modules`): PEFT ignores tensors of untargeted modules and gives targeted modules without tensors a
    fresh initialisation, so either way it would serve something else. A config without `target_modules` is not
    checked (PEFT falls back to its per-architecture default)."""
    targeted = targeted_modules(patterns, base)
    if targeted is None:
        return
    targets = patterns.config["target_modules"]
    layers = layers_to_transform(patterns.config, targets)
    selection = f"target_modules {targets!r}"
    if layers is not None:
        selection += f" in layers {layers}"
        if patterns.config.get("layers_pattern"):
            selection += f" (found by layers_pattern {patterns.config['layers_pattern']!r})"
    for layer, module in sorted(found - targeted):
        raise AdapterError(
            f"holds tensors for {module_key(layer, module)}, which {selection} does not target (PEFT would ignore "
            "them)",
            WEIGHTS_FILE,
        )
    for layer, module in sorted(targeted - found):
        raise AdapterError(
            f"{selection} targets {module_key(layer, module)}, but {WEIGHTS_FILE} holds no tensors for it (PEFT would "
            "initialise it afresh)",
            CONFIG_FILE,
        )


def targeted_modules(patterns: ConfigPatterns, base: BaseModelShape) -> set[tuple[int, str]] | None:
    """The (layer, module) pairs PEFT adapts under the config's `target_modules`, `exclude_modules`,
    `layers_to_transform` and `layers_pattern`, or None without `target_modules`."""
    targets = patterns.names_or_regex("target_modules")
    if targets is None:
        return None
    exclude = patterns.names_or_regex("exclude_modules")
    layers = layers_to_transform(patterns.config, targets)
    candidates = [(layer, module) for layer in range(base.num_layers) for module in TARGET_MODULES]
    if isinstance(targets, list):
        keys = [module_key(*candidate) for candidate in candidates]
        unknown = [t for t in targets if not any(names_module(t, key) for key in keys)]
        if unknown:
            raise AdapterError(
                f"target_modules names {unknown[0]!r}, which is not a projection of this base model; supported: "
                + ", ".join(TARGET_MODULES),
                CONFIG_FILE,
            )
    targeted = set()
    for layer, module in candidates:
        key = module_key(layer, module)
        if exclude and matches(patterns, "exclude_modules", exclude, key):
            continue
        if not (is_all_linear(targets) or matches(patterns, "target_modules", targets, key)):
            continue
        if layers is None or patterns.layer_index(key) in layers:
            targeted.add((layer, module))
    return targeted


def layers_to_transform(config: dict[str, Any], targets: str | list[str]) -> list[int] | None:
    """The layer indices `layers_to_transform` keeps, or None for every layer. PEFT reads it (and `layers_pattern`)
    only with a list of target names: `LoraConfig` refuses either beside a string `target_modules` (other kinds
    ignore them there; we refuse), and refuses `layers_pattern` without `layers_to_transform`; an empty list keeps
    every layer."""
    layers, layers_pattern = config.get("layers_to_transform"), config.get("layers_pattern")
    if isinstance(targets, str) and (layers is not None or layers_pattern is not None):
        raise AdapterError(
            f"layers_to_transform={layers!r} and layers_pattern={layers_pattern!r} need a list of target_modules, "
            f"not the string {targets!r} (PEFT's LoraConfig refuses them beside one)",
            CONFIG_FILE,
        )
    if layers_pattern and layers is None:
        raise AdapterError("layers_pattern needs layers_to_transform (PEFT refuses it alone)", CONFIG_FILE)
    layers = [layers] if isinstance(layers, int) else layers
    if not (layers is None or (isinstance(layers, list) and all(isinstance(i, int) for i in layers))):
        raise AdapterError(f"layers_to_transform must be an integer or a list of them, got {layers!r}", CONFIG_FILE)
    return layers or None


def is_all_linear(targets: str | list[str]) -> bool:
    return isinstance(targets, str) and targets.lower() == ALL_LINEAR


def matches(patterns: ConfigPatterns, field: str, spec: str | list[str], key: str) -> bool:
    """PEFT's match of `target_modules` / `exclude_modules` against a module name: a string is a regex that must
    match the whole name, a list holds names that equal it or end it after a dot."""
    if isinstance(spec, str):
        return patterns.fullmatch(field, key)
    return any(names_module(item, key) for item in spec)


def names_module(name: str, key: str) -> bool:
    return key == name or key.endswith(f".{name}")
