"""The server's one configuration dataclass, validated once and passed down whole."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

DType = Literal["float32", "bfloat16", "float16"]
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(slots=True)
class ServeConfig:
    model: Path
    served_model_name: str | None = None  # default: the model directory's name
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: DType = "bfloat16"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    quantize: Literal["none", "nf4"] = "none"
    # NF4 product per layer (serving/models/quant.py): auto = bitsandbytes' packed bf16 kernel where the layer's
    # shape and the CPU allow it, dequantise-and-multiply elsewhere
    nf4_path: Literal["auto", "dequantize", "packed"] = "auto"
    # Scheduler
    max_num_seqs: int = 64
    max_batch_tokens: int = 4096
    max_model_len: int | None = None  # default: the checkpoint's max_position_embeddings
    max_waiting: int = 1024  # waiting sequences (choices) beyond this: new requests get 429
    # Paged KV cache
    block_size: int = 16
    kv_cache_gb: float = 1.0
    # auto: the model's dtype. Keys and values are computed in it, so a float32 cache of a bf16 model holds the same
    # values at twice the bytes; attention computes in float32 on the CPU either way (the decode kernel converts rows
    # as it reads them), so the cache's dtype changes no result there, only the bytes each decode step reads.
    kv_cache_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    num_kv_blocks: int | None = None  # overrides kv_cache_gb (tests use tiny pools to force preemption)
    # Adapters
    adapters: dict[str, Path] = field(default_factory=dict)
    merge_adapter: str | None = None
    max_resident_adapters: int = 32
    # Keep a coded copy (12 bits a weight, lossless; kernels/bf16_codec.py) of bf16 LoRA slots on the CPU, which the
    # decode op streams instead: with 32 distinct adapters the op takes about a fifth less time; the copy adds 0.76x
    # the LoRA slots' memory.
    code_lora_slots: bool = True
    max_host_adapters: int = 256
    store: Path = Path(".cache/store")
    import_dir: Path | None = None
    max_adapter_bytes: int = 512 * 1024 * 1024  # uploads above: 413
    # JSON bodies above: 413 (the generation routes and load/unload_lora_adapter; uploads use max_adapter_bytes)
    max_request_bytes: int = 4 * 1024 * 1024
    max_lora_rank: int = 16  # uploads above: 422 (vLLM's default); start-up adapters may exceed it
    max_virtual_tokens: int = 128  # prefix adapters above: 422
    max_adapters_per_tenant: int = 1024  # uploads beyond: 409
    api_keys: Path | None = None
    # /metrics series labelled with adapter ids (which name tenants' adapters); off: usage as base/other only
    metrics_per_adapter: bool = False
    num_threads: int | None = None  # torch intra-op threads; default: torch's choice
    # Which engine serves requests behind the one HTTP API (serving/backends.py): our own, or vLLM's AsyncLLM (LoRA
    # adapters only; the three settings below pass through to vLLM for multi-GPU and multi-node serving).
    backend: Literal["native", "vllm"] = "native"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: Literal["mp", "ray", "uni"] | None = None  # None: vLLM's choice
    # Replicas of the engine behind Ray Serve's proxy, routed by adapter (serving/replicas/); None: one process, no Ray
    replicas: int | None = None
    ray_address: str | None = None  # join this Ray cluster (`ray start --head` printed it); None: start a local one
    # Run the scheduler/model/sampler loop in a process of its own (serving/engine/core.py), so that it never waits
    # on the HTTP side's event loop for the GIL; False: a thread of the server's process, which on 2 cores served W
    # as fast (a third busy process there costs as much as the GIL waits it removes; docs/benchmarks.md).
    engine_process: bool = False

    def __post_init__(self) -> None:
        self.model = Path(self.model)
        if self.dtype not in TORCH_DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(TORCH_DTYPES)}, got {self.dtype!r}")
        for name in ("max_num_seqs", "max_batch_tokens", "block_size", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        for name in (
            "max_resident_adapters",
            "max_host_adapters",
            "max_adapter_bytes",
            "max_request_bytes",
            "max_lora_rank",
            "max_virtual_tokens",
            "max_adapters_per_tenant",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        self.store = Path(self.store)
        if self.replicas is not None and self.replicas < 1:
            raise ValueError("--replicas must be at least 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError("--num-kv-blocks must be at least 2")
        if self.kv_cache_gb <= 0:
            raise ValueError("--kv-cache-gb must be positive")
        if self.quantize not in ("none", "nf4"):
            raise ValueError(f"--quantize must be none or nf4, got {self.quantize!r}")
        if self.quantize == "nf4" and self.merge_adapter is not None:
            # Folding a delta into NF4 codes means dequantise, add, requantise: lossy (QLoRA, ADAPTERS.md 1.7).
            raise ValueError("--merge-adapter cannot be combined with --quantize nf4: adapters run unmerged on NF4")
        if self.served_model_name is None:
            self.served_model_name = self.model.resolve().name
        self._check_backend()

    def _check_backend(self) -> None:
        if self.backend not in ("native", "vllm"):
            raise ValueError(f"--backend must be native or vllm, got {self.backend!r}")
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError("--tensor-parallel-size and --pipeline-parallel-size must be at least 1")
        if self.backend == "native":
            if (self.tensor_parallel_size, self.pipeline_parallel_size) != (1, 1) or self.distributed_executor_backend:
                raise ValueError(
                    "--tensor-parallel-size, --pipeline-parallel-size and --distributed-executor-backend "
                    "need --backend vllm"
                )
            return
        if self.replicas is not None:
            raise ValueError("--replicas runs the native engine only; for vLLM, scale out with its own options")
        if self.merge_adapter is not None:
            raise ValueError("--merge-adapter is not available with --backend vllm (it serves LoRA adapters unmerged)")
        if self.quantize != "none":
            raise ValueError("--quantize nf4 is not available with --backend vllm")

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    @property
    def torch_kv_cache_dtype(self) -> torch.dtype:
        if self.kv_cache_dtype == "auto":
            return self.torch_dtype
        return TORCH_DTYPES[self.kv_cache_dtype]

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
