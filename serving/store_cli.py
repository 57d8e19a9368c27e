"""Command-line pieces of the adapter store: the `serve` flags for the store, tenants and limits, and
`switchboard upload DIR --adapter-id ID [--url URL] [--api-key KEY]`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from switchboard.adapters_store.kinds.base import CONFIG_FILE, WEIGHTS_FILE

DEFAULT_URL = "http://127.0.0.1:8000"


def add_store_args(p: argparse.ArgumentParser) -> None:
    """`serve` flags: where adapters live, who may use them, and what an upload may be."""
    p.add_argument("--store", type=Path, default=Path(".cache/store"), help="adapter store directory")
    p.add_argument("--max-host-adapters", type=int, default=256, help="parsed adapters kept in host memory (LRU)")
    p.add_argument("--import-dir", type=Path, default=None, help="load_lora_adapter paths must lie under it")
    p.add_argument("--max-adapter-bytes", type=int, default=512 * 1024 * 1024, help="larger uploads get 413")
    p.add_argument("--max-lora-rank", type=int, default=16, help="uploads of a higher LoRA rank get 422")
    p.add_argument("--max-virtual-tokens", type=int, default=128, help="prefix adapters above get 422")
    p.add_argument("--max-adapters-per-tenant", type=int, default=1024, help="uploads beyond get 409")
    p.add_argument("--api-keys", type=Path, default=None, help="file of lines `KEY TENANT [admin]`; default: open")


def store_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ServeConfig fields `add_store_args` sets."""
    return {
        "store": args.store,
        "max_host_adapters": args.max_host_adapters,
        "import_dir": args.import_dir,
        "max_adapter_bytes": args.max_adapter_bytes,
        "max_lora_rank": args.max_lora_rank,
        "max_virtual_tokens": args.max_virtual_tokens,
        "max_adapters_per_tenant": args.max_adapters_per_tenant,
        "api_keys": args.api_keys,
    }


def add_upload_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("upload", help="upload a PEFT adapter directory to a running server")
    p.add_argument("dir", type=Path, help="PEFT directory: adapter_config.json + adapter_model.safetensors")
    p.add_argument("--adapter-id", required=True)
    p.add_argument("--url", default=DEFAULT_URL)
    p.add_argument("--api-key", default=None, help="default: $SWITCHBOARD_API_KEY")
    p.add_argument("--overwrite", action="store_true", help="make a new version of an existing id")
    p.add_argument("--public", action="store_true", help="publish to every tenant (admin keys only)")


def server_root(url: str) -> str:
    """The server's root URL: a trailing `/v1` (the `base_url` an OpenAI client takes) is dropped, so that the upload
    goes to `/v1/adapters`, not `/v1/v1/adapters`."""
    url = url.rstrip("/")
    return url.removesuffix("/v1")


def run_upload(args: argparse.Namespace) -> int:
    """POST the directory as multipart; prints the server's JSON answer. Exit status 0 on 201, 1 otherwise (also
    when the server cannot be reached: one line saying so, no traceback)."""
    import httpx

    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (args.dir / name).is_file():
            raise FileNotFoundError(f"{args.dir / name} does not exist (a PEFT directory saved with safetensors)")
    key = args.api_key or os.environ.get("SWITCHBOARD_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    params = {k: "true" for k in ("overwrite", "public") if getattr(args, k)}
    with open(args.dir / CONFIG_FILE, "rb") as config, open(args.dir / WEIGHTS_FILE, "rb") as weights:
        files = {
            CONFIG_FILE: (CONFIG_FILE, config, "application/json"),
            WEIGHTS_FILE: (WEIGHTS_FILE, weights, "application/octet-stream"),
        }
        url = f"{server_root(args.url)}/v1/adapters"
        try:
            resp = httpx.post(
                url, data={"adapter_id": args.adapter_id}, files=files, params=params, headers=headers, timeout=600
            )
        except httpx.TransportError as exc:
            reason = str(exc) or type(exc).__name__
            print(f"switchboard: upload failed: cannot reach {url}: {reason}; is the server running?", file=sys.stderr)
            return 1
    try:
        body: Any = resp.json()
    except json.JSONDecodeError:
        body = resp.text
    print(json.dumps(body, indent=2) if not isinstance(body, str) else body)
    if resp.status_code != 201:
        print(f"switchboard: upload failed with HTTP {resp.status_code}", file=sys.stderr)
        return 1
    return 0
