"""What the soak sends besides well-formed requests: hostile requests and uploads, and the good uploads it checks.

A hostile case is one HTTP request the server must refuse with a 4xx (or, where `may_succeed`, may also answer in
full: `top_p` 1e-300 is a valid setting). A 5xx, a timeout, a dropped connection (unless `may_close`: a server may
close the connection on a body over its limit) or a 2xx where a refusal was due is a failure. Cases are built from
the run's state (tenants, their acknowledged uploads, the limits), seeded by the caller's `random.Random`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load, save

from switchboard.adapters_store import synthetic
from switchboard.adapters_store.kinds.base import ATTENTION, CONFIG_FILE, WEIGHTS_FILE, BaseModelShape
from switchboard.adapters_store.store import content_sha256

Files = synthetic.Files
COMPLETIONS, CHAT, ADAPTERS = "/v1/completions", "/v1/chat/completions", "/v1/adapters"
# A rank_pattern key that Python's `re` backtracks on for minutes against a module name (2^len steps), holding the
# GIL: a server whose patterns ran on `re` would stall whole. Ours match with RE2 (linear time), which has no
# backreferences: the server must refuse it at once (422), never try it.
PATHOLOGICAL_REGEX = r"(.|.)*\1!"


@dataclass(frozen=True, slots=True)
class Upload:
    """An adapter a tenant uploads, and what the store must keep of it."""

    tenant: str
    adapter_id: str
    kind: str
    files: Files

    @property
    def digests(self) -> dict[str, str]:
        return {name: hashlib.sha256(data).hexdigest() for name, data in self.files.items()}

    @property
    def sha256(self) -> str:
        """The store's address of these exact bytes (adapters_store.store.content_sha256)."""
        d = self.digests
        return content_sha256(d[CONFIG_FILE], d[WEIGHTS_FILE])


@dataclass(slots=True)
class Probe:
    """One hostile request: `kwargs` go to httpx's `request` (json, content, files, data, params, headers)."""

    case: str
    method: str
    path: str
    kwargs: dict[str, object] = field(default_factory=dict)
    may_succeed: bool = False
    may_close: bool = False


@dataclass(slots=True)
class SoakState:
    """What the cases draw on: tenants and their keys, public adapters (id -> kind), acknowledged uploads."""

    keys: dict[str, str]  # tenant -> API key
    public: dict[str, str]
    acked: dict[tuple[str, str], Upload] = field(default_factory=dict)  # (tenant, id) -> upload
    base_model: str = ""

    def visible(self, tenant: str) -> list[str]:
        return sorted(self.public) + sorted(i for t, i in self.acked if t == tenant)

    def foreign(self, tenant: str, rng: random.Random) -> str | None:
        """The id of an adapter another tenant uploaded (and this one has none of the same id), if any."""
        own = {i for t, i in self.acked if t == tenant}
        others = sorted(i for t, i in self.acked if t != tenant and i not in own and i not in self.public)
        return rng.choice(others) if others else None


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _text(rng: random.Random, words: int) -> str:
    vocab = "the soak sends many small requests to every adapter while tenants upload and the server keeps going"
    return " ".join(rng.choice(vocab.split()) for _ in range(words))


async def _chunked(head: bytes, size: int, tail: bytes) -> AsyncIterator[bytes]:
    """A body of `size` filler bytes sent without Content-Length (chunked), 64 KiB at a time."""
    yield head
    for start in range(0, size, 1 << 16):
        yield b"y" * min(1 << 16, size - start)
    yield tail


def generation_probes(state: SoakState, tenant: str, rng: random.Random, max_request_bytes: int) -> list[Probe]:
    """Every hostile generation case for `tenant` (one is drawn per hostile request)."""
    key = state.keys[tenant]
    adapter = rng.choice(sorted(state.public))
    json_h = {**auth(key), "Content-Type": "application/json"}

    def body(**fields: object) -> dict[str, object]:
        return {"model": adapter, "prompt": _text(rng, 6), "max_tokens": 4, **fields}

    def chat(**fields: object) -> dict[str, object]:
        return {"model": adapter, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}

    def raw(text: str) -> dict[str, object]:
        return {"content": text.encode(), "headers": json_h}

    over = max_request_bytes + 4096
    probes = [
        Probe("top_p 1e-300", "POST", COMPLETIONS, {"json": body(top_p=1e-300, temperature=1.0)}, may_succeed=True),
        Probe(
            "top_p 1e-300, streamed chat",
            "POST",
            CHAT,
            {"json": chat(top_p=1e-300, temperature=1.0, stream=True)},
            may_succeed=True,
        ),
        Probe("temperature -3", "POST", COMPLETIONS, {"json": body(temperature=-3)}),
        Probe("temperature a string", "POST", COMPLETIONS, {"json": body(temperature="hot")}),
        Probe("max_tokens 0", "POST", COMPLETIONS, {"json": body(max_tokens=0)}),
        Probe("max_tokens 1e9", "POST", COMPLETIONS, {"json": body(max_tokens=10**9)}),
        Probe("n 100000", "POST", COMPLETIONS, {"json": body(n=100_000)}),
        Probe("logprobs 1000", "POST", COMPLETIONS, {"json": body(logprobs=1000)}),
        Probe("seed 2**70", "POST", COMPLETIONS, {"json": body(seed=2**70, temperature=1.0)}),
        Probe("token ids out of vocabulary", "POST", COMPLETIONS, {"json": body(prompt=[10**9, -5])}),
        Probe("empty prompt", "POST", COMPLETIONS, {"json": body(prompt="")}),
        Probe("prompt over the context", "POST", COMPLETIONS, {"json": body(prompt="z " * 5000)}),
        Probe("lone surrogate prompt", "POST", COMPLETIONS, raw(f'{{"model": "{adapter}", "prompt": "a\\ud800b"}}')),
        Probe(
            "lone surrogate message",
            "POST",
            CHAT,
            raw(f'{{"model": "{adapter}", "messages": [{{"role": "user", "content": "\\udfff"}}]}}'),
        ),
        Probe(
            "lone surrogate stop",
            "POST",
            COMPLETIONS,
            raw(f'{{"model": "{adapter}", "prompt": "ab", "max_tokens": 4, "stop": ["\\ud800"]}}'),
            may_succeed=True,
        ),
        Probe("invalid UTF-8", "POST", COMPLETIONS, {"content": b'{"prompt": "a\xff\xfe"}', "headers": json_h}),
        Probe("truncated JSON", "POST", COMPLETIONS, raw('{"model": "')),
        Probe("nested JSON", "POST", COMPLETIONS, raw("[" * 50_000 + "]" * 50_000)),
        Probe("over --max-request-bytes", "POST", COMPLETIONS, {"json": body(prompt="y" * over)}, may_close=True),
        Probe(
            "over --max-request-bytes, chunked",
            "POST",
            COMPLETIONS,
            {"content": _chunked(b'{"prompt": "', over, b'"}'), "headers": json_h},
            may_close=True,
        ),
        Probe("unknown model", "POST", COMPLETIONS, {"json": body(model="no-such-adapter")}),
        Probe("unknown adapter_id", "POST", COMPLETIONS, {"json": body(model=state.base_model, adapter_id="nope")}),
        Probe("logit_bias out of vocabulary", "POST", COMPLETIONS, {"json": body(logit_bias={"999999999": 5})}),
        Probe("no API key", "POST", COMPLETIONS, {"json": body(), "headers": {}}),
        Probe("wrong API key", "POST", COMPLETIONS, {"json": body(), "headers": auth("not-a-key")}),
    ]
    if (other := state.foreign(tenant, rng)) is not None:
        probes += [
            Probe("another tenant's adapter", "POST", COMPLETIONS, {"json": body(model=other)}),
            Probe("another tenant's adapter, GET", "GET", f"{ADAPTERS}/{other}"),
            Probe("another tenant's adapter, DELETE", "DELETE", f"{ADAPTERS}/{other}"),
        ]
    for probe in probes:
        probe.kwargs.setdefault("headers", auth(key))
    return probes


def multipart(files: Files) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(name, (name, data, "application/octet-stream")) for name, data in files.items()]


def lora_upload(base: BaseModelShape, tenant: str, adapter_id: str, seed: int) -> Upload:
    """A seeded LoRA of rank 2-8 on two to four attention projections (a few hundred kB)."""
    rng = random.Random(seed)
    modules = tuple(sorted(rng.sample(ATTENTION, rng.randint(2, 4))))
    files = synthetic.lora_files(base, rank=rng.choice((2, 4, 8)), modules=modules, seed=seed)
    return Upload(tenant, adapter_id, "lora", files)


def scaled_copy(files: Files, kind: str, tenant: str, adapter_id: str, factor: float) -> Upload:
    """One of the demo adapters with every tensor times `factor`: a distinct version of a kind the store holds."""
    tensors = {name: t * factor for name, t in load(files[WEIGHTS_FILE]).items()}
    return Upload(tenant, adapter_id, kind, {CONFIG_FILE: files[CONFIG_FILE], WEIGHTS_FILE: save(tensors)})


BAD_UPLOADS = (
    "alpha 1e300",
    "NaN tensor",
    "wrong shape",
    "truncated weights",
    "config not JSON",
    "rank over the limit",
    "unknown peft_type",
    "rank_pattern not a regex",
    "duplicate part",
    "pickle weights",
    "missing weights",
    "invalid id",
    "over --max-adapter-bytes",
    "pathological rank_pattern",
)


def bad_upload(case: str, base: BaseModelShape, seed: int, max_adapter_bytes: int) -> tuple[str, list]:
    """(adapter id, multipart parts) of the hostile upload `case`: each gets a 4xx and must never reach the store."""
    good = lora_upload(base, "x", "x", seed).files
    config = json.loads(good[CONFIG_FILE])

    def with_config(**fields: object) -> list:
        return multipart({CONFIG_FILE: json.dumps({**config, **fields}).encode(), WEIGHTS_FILE: good[WEIGHTS_FILE]})

    def with_tensor(change: Callable[[torch.Tensor], torch.Tensor]) -> list:
        tensors = load(good[WEIGHTS_FILE])
        name = sorted(tensors)[seed % len(tensors)]
        tensors[name] = change(tensors[name])
        return multipart({CONFIG_FILE: good[CONFIG_FILE], WEIGHTS_FILE: save(tensors)})

    def nan(t: torch.Tensor) -> torch.Tensor:
        t[0, 0] = float("nan")
        return t

    build: dict[str, Callable[[], list]] = {
        "alpha 1e300": lambda: with_config(lora_alpha=1e300),
        "NaN tensor": lambda: with_tensor(nan),
        "wrong shape": lambda: with_tensor(lambda t: torch.zeros(t.shape[0] + 1, t.shape[1])),
        "truncated weights": lambda: multipart({**good, WEIGHTS_FILE: good[WEIGHTS_FILE][:-100]}),
        "config not JSON": lambda: multipart({**good, CONFIG_FILE: b"{peft_type: LORA"}),
        "rank over the limit": lambda: with_config(r=4096),
        "unknown peft_type": lambda: with_config(peft_type="BOFT"),
        "rank_pattern not a regex": lambda: with_config(rank_pattern={"(": 2}),
        "duplicate part": lambda: [*multipart(good), *multipart({WEIGHTS_FILE: good[WEIGHTS_FILE]})],
        "pickle weights": lambda: multipart({CONFIG_FILE: good[CONFIG_FILE], "adapter_model.bin": b"\x80."}),
        "missing weights": lambda: multipart({CONFIG_FILE: good[CONFIG_FILE]}),
        "invalid id": lambda: multipart(good),
        "over --max-adapter-bytes": lambda: multipart({**good, WEIGHTS_FILE: bytes(max_adapter_bytes + 1024)}),
        "pathological rank_pattern": lambda: with_config(rank_pattern={PATHOLOGICAL_REGEX: 2}),
    }
    return ("../etc" if case == "invalid id" else f"bad-{seed}"), build[case]()


def upload_probe(case: str, adapter_id: str, parts: list, key: str) -> Probe:
    kwargs = {"files": parts, "data": {"adapter_id": adapter_id}, "headers": auth(key)}
    return Probe(f"upload: {case}", "POST", ADAPTERS, kwargs, may_close=case.startswith("over"))


def demo_files(adapters: dict[str, Path]) -> dict[str, tuple[str, Files]]:
    """Public adapter id -> (kind, its two files), read from the directories the server was started with."""
    kinds = {"LORA": "lora", "LOKR": "krona", "IA3": "ia3", "PREFIX_TUNING": "prefix"}
    out = {}
    for adapter_id, path in adapters.items():
        files = {name: (path / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}
        out[adapter_id] = (kinds.get(json.loads(files[CONFIG_FILE])["peft_type"], "?"), files)
    return out
