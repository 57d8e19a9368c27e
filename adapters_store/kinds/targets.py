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

ALL_LINEAR = "all-linear"  # PEFT's shorthand for every linear layer but the output head


def check_targets(patterns: ConfigPatterns, found: set[tuple[int, str]], base: BaseModelShape) -> None:
    """The modules the file holds tensors for (`found`) must be exactly those PEFT would adapt under the config
    (`targeted_modules`): PEFT ignores tensors of untargeted modules and gives targeted modules without tensors a
    fresh initialisation, so either way it would serve something else. A config without `target_modules` is not
    checked (PEFT falls back to its per-architecture default)."""
    targeted = targeted_modules(patterns, base)
    if targeted is None:
        return
    selection = f"target_modules {patterns.config['target_modules']!r}"
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
    """The (layer, module) pairs PEFT adapts under the config's `target_modules`, `exclude_modules` and
    `layers_to_transform`, or None without `target_modules`."""
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
        if layers is None or layer in layers:
            targeted.add((layer, module))
    return targeted


def layers_to_transform(config: dict[str, Any], targets: str | list[str]) -> list[int] | None:
    """The layer indices `layers_to_transform` keeps, or None for every layer."""
    layers = config.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else layers
    if not (layers is None or (isinstance(layers, list) and all(isinstance(i, int) for i in layers))):
        raise AdapterError(f"layers_to_transform must be an integer or a list of them, got {layers!r}", CONFIG_FILE)
    return layers


def is_all_linear(targets: str | list[str]) -> bool:
    return targets == ALL_LINEAR


def matches(patterns: ConfigPatterns, field: str, spec: str | list[str], key: str) -> bool:
    """PEFT's match of `target_modules` / `exclude_modules` against a module name: a string is a regex that must
    match the whole name, a list holds names that equal it or end it after a dot."""
    if isinstance(spec, str):
        return patterns.fullmatch(field, key)
    return any(names_module(item, key) for item in spec)


def names_module(name: str, key: str) -> bool:
    return key == name or key.endswith(f".{name}")
