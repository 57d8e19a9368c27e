"""One validated configuration for a load test, written whole into results.json so a run can be repeated."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path


class Popularity(StrEnum):
    """How requests pick their adapter among the N under test."""

    UNIFORM = "uniform"  # each request draws an adapter uniformly at random
    ZIPF = "zipf"  # adapter i (0-based) drawn with probability proportional to 1 / (i + 1) ** alpha
    IDENTICAL = "identical"  # every request uses the first adapter
    DISTINCT = "distinct"  # round robin: consecutive requests use different adapters


class Endpoint(StrEnum):
    COMPLETIONS = "completions"
    CHAT = "chat"


class PromptFormat(StrEnum):
    IDS = "ids"  # token-id prompts: exact prompt lengths on any server (completions only)
    TEXT = "text"  # words; the length is approximate (the server's usage reports the true count)


@dataclass(frozen=True, slots=True)
class LengthSpec:
    """A length that is fixed (lo == hi) or drawn uniformly from [lo, hi]. Parsed from "64" or "32:128"."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        if not 1 <= self.lo <= self.hi:
            raise ValueError(f"a length range needs 1 <= lo <= hi, got {self.lo}:{self.hi}")

    @classmethod
    def parse(cls, text: str) -> LengthSpec:
        lo, sep, hi = text.partition(":")
        try:
            return cls(int(lo), int(hi) if sep else int(lo))
        except ValueError as exc:
            raise ValueError(f"expected a length N or a range LO:HI, got {text!r}") from exc

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}:{self.hi}"


@dataclass(slots=True)
class LoadTestConfig:
    url: str  # server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)
    out: Path
    rate: float | None = None  # Poisson arrivals, requests per second
    concurrency: int | None = None  # closed loop: this many requests always in flight
    num_requests: int | None = None
    duration_s: float | None = None
    adapters: list[str] = field(default_factory=list)  # adapter ids; empty means: discover or base model
    num_adapters: int | None = None  # use (or upload) this many adapters
    upload_model: Path | None = None  # build N LoRA adapters for this base checkpoint and upload them first
    upload_rank: int = 8
    popularity: Popularity = Popularity.UNIFORM
    zipf_alpha: float = 1.0
    prompt_len: LengthSpec = field(default_factory=lambda: LengthSpec(64, 64))
    output_len: LengthSpec = field(default_factory=lambda: LengthSpec(64, 64))
    dataset: Path | None = None  # JSONL rows {"prompt": str, "max_tokens": int?}
    prompt_format: PromptFormat = PromptFormat.IDS
    token_id_range: tuple[int, int] = (10, 500)
    endpoint: Endpoint = Endpoint.COMPLETIONS
    model: str | None = None  # the base model's name; discovered from /v1/models when not given
    send_adapter_id: bool = False  # also send Switchboard's `adapter_id` field (model= is always the adapter)
    ignore_eos: bool = True
    api_key: str | None = None
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    request_timeout_s: float = 300.0
    warmup_requests: int = 0  # sent (concurrently, up to --concurrency at a time) before the clock starts; not recorded
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give exactly one of --rate (Poisson arrivals) or --concurrency (closed loop)")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("--rate must be positive")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("--concurrency must be at least 1")
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("give --num-requests, --duration or both: a load test must stop by itself")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError("--num-requests must be at least 1")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("--duration must be positive")
        if self.adapters and self.num_adapters is not None and self.num_adapters != len(self.adapters):
            raise ValueError("--num-adapters and --adapters disagree; give one of them")
        if self.upload_model is not None and (self.num_adapters is None or self.adapters):
            raise ValueError("--upload-model needs --num-adapters N (and no --adapters)")
        if self.num_adapters is not None and self.num_adapters < 1:
            raise ValueError("--num-adapters must be at least 1")
        if self.warmup_requests < 0:
            raise ValueError("--warmup-requests must be >= 0")
        if self.zipf_alpha <= 0:
            raise ValueError("--zipf must be positive")
        if self.prompt_format is PromptFormat.IDS and self.endpoint is Endpoint.CHAT and self.dataset is None:
            raise ValueError("chat requests carry text: use --prompt-format text with --endpoint chat")
        lo, hi = self.token_id_range
        if not 0 <= lo < hi:
            raise ValueError("--token-id-range needs 0 <= LO < HI")
        self.url = self.url.rstrip("/").removesuffix("/v1")

    def to_json(self) -> dict[str, object]:
        """Every field as plain JSON values."""
        out: dict[str, object] = {}
        for name in self.__slots__:  # type: ignore[attr-defined]
            value = getattr(self, name)
            if isinstance(value, Path | LengthSpec):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[name] = value
        out.pop("api_key")  # never written to disk
        return out
