"""Which class reads which PEFT `peft_type`, and the one entry point that loads a PEFT directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from switchboard.adapters_store.kinds.base import (
    CONFIG_FILE,
    Adapter,
    AdapterError,
    AdapterKind,
    BaseModelShape,
    adapter_files,
    check_probe,
    read_config,
)
from switchboard.adapters_store.kinds.ia3 import IA3Adapter
from switchboard.adapters_store.kinds.krona import KronaAdapter
from switchboard.adapters_store.kinds.lora import LoraAdapter
from switchboard.adapters_store.kinds.prefix import PrefixAdapter


class AdapterClass(Protocol):
    def load(self, path: Path, config: dict[str, Any], base: BaseModelShape, name: str) -> Adapter: ...


# adapter_config.json `peft_type` -> the class that reads it
ADAPTER_CLASSES: dict[str, AdapterClass] = {
    "LORA": LoraAdapter,
    "LOKR": KronaAdapter,
    "IA3": IA3Adapter,
    "PREFIX_TUNING": PrefixAdapter,
}
# the `peft_type` a training run writes for each kind
PEFT_TYPES: dict[AdapterKind, str] = {
    AdapterKind.LORA: "LORA",
    AdapterKind.KRONA: "LOKR",
    AdapterKind.IA3: "IA3",
    AdapterKind.PREFIX: "PREFIX_TUNING",
}


def load_adapter(path: Path | str, base: BaseModelShape, name: str | None = None) -> Adapter:
    """Read and validate the PEFT directory `path` against `base`; `name` defaults to the directory's name.

    Raises AdapterError (naming the file and the problem) for anything malformed or incompatible.
    """
    path = Path(path)
    config_file, _ = adapter_files(path)
    config = read_config(config_file)
    peft_type = config.get("peft_type")
    adapter_class = ADAPTER_CLASSES.get(peft_type) if isinstance(peft_type, str) else None
    if adapter_class is None:
        raise AdapterError(
            f"peft_type {peft_type!r} is not supported; supported: {', '.join(ADAPTER_CLASSES)}", CONFIG_FILE
        )
    adapter = adapter_class.load(path, config, base, name or path.name)
    check_probe(adapter, base)
    return adapter
