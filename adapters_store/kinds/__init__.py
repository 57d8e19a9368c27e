"""Adapter kinds behind one `Adapter` protocol: parse a PEFT directory, validate it against the base model, fold
scales once, and merge. One module per kind; `registry.ADAPTER_CLASSES` maps PEFT's `peft_type` to its class."""

from switchboard.adapters_store.kinds.base import Adapter, AdapterError, AdapterKind, BaseModelShape
from switchboard.adapters_store.kinds.ia3 import IA3Adapter
from switchboard.adapters_store.kinds.krona import KronaAdapter
from switchboard.adapters_store.kinds.lora import LoraAdapter
from switchboard.adapters_store.kinds.prefix import PrefixAdapter
from switchboard.adapters_store.kinds.registry import ADAPTER_CLASSES, PEFT_TYPES, load_adapter

__all__ = [
    "ADAPTER_CLASSES",
    "PEFT_TYPES",
    "Adapter",
    "AdapterError",
    "AdapterKind",
    "BaseModelShape",
    "IA3Adapter",
    "KronaAdapter",
    "LoraAdapter",
    "PrefixAdapter",
    "load_adapter",
]
