"""Shared fixtures: a small seeded checkpoint and PEFT adapters of every kind, built locally (nothing is downloaded).

The session owns its state: what it and the servers it starts would cache goes to a directory of its own, removed
at the end, and the session fails if it changed the repository's caches or the user's (`_watched_state`).
"""

from __future__ import annotations

import os
import tempfile

# Set before the imports below, some of which read them (huggingface_hub reads HF_HOME at import; torch inductor,
# which bitsandbytes imports, creates its cache directory then); the servers the tests start inherit them. The C++
# kernels are thus built once per session rather than once per machine.
os.environ["SWITCHBOARD_TEST_CACHES"] = tempfile.mkdtemp(prefix="switchboard-test-caches-")
os.environ.update(
    {
        var: os.path.join(os.environ["SWITCHBOARD_TEST_CACHES"], name)
        for var, name in [
            ("XDG_CACHE_HOME", "xdg"),  # kernels/cpp_build.py and other XDG-minded code (torch hub)
            ("MPLCONFIGDIR", "matplotlib"),  # its font cache and config
            ("HF_HOME", "huggingface"),
            ("TRITON_HOME", "triton"),  # its cache, dump and override directories
            ("TRITON_CACHE_DIR", "triton/cache"),  # which a user's own setting would otherwise override
            ("TORCHINDUCTOR_CACHE_DIR", "torchinductor"),
        ]
    }
)
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded (bitsandbytes asks the Hub for kernels at import)
os.environ.pop("SWITCHBOARD_API_KEY", None)  # `switchboard upload` would send a key from the user's shell

import contextlib
import shutil
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoKrConfig, LoraConfig, PeftConfig, PrefixTuningConfig

from switchboard.adapters_store.kinds.base import ALL_LINEAR
from switchboard.serving.demo import build_demo_model, tiny_spec
from switchboard.serving.demo_adapters import build_adapter

REPO = Path(__file__).resolve().parents[1]
HOME_CACHE = Path.home() / ".cache"
# Compared path by path before and after the session: the repository's caches and outputs, and the user caches that
# our kernels and the libraries above write by default.
WATCHED_TREES = (
    REPO / ".cache",
    REPO / "bench-results",
    HOME_CACHE / "switchboard",
    HOME_CACHE / "matplotlib",
    HOME_CACHE / "huggingface",
    HOME_CACHE / "torch",
    Path.home() / ".config" / "matplotlib",
    Path.home() / ".triton",
)
# Compared by their entries only (a new one: a relative path written to the working directory, or a library not
# listed above): other work updates the package managers' caches in ~/.cache while the suite runs.
WATCHED_LISTINGS = (REPO, HOME_CACHE)
UNWATCHED = {".pytest_cache"}  # pytest's own (--lf), written at the end of every session
_BEFORE = pytest.StashKey[dict[Path, int | None]]()
_CHANGED = pytest.StashKey[list[Path]]()


def _watched_state() -> dict[Path, int | None]:
    """Each watched path -> its mtime in ns, or None for an entry whose presence alone is compared."""
    state: dict[Path, int | None] = {}
    for top in WATCHED_LISTINGS:
        if top.is_dir():
            state |= dict.fromkeys((p for p in top.iterdir() if p.name not in UNWATCHED), None)
    for tree in WATCHED_TREES:
        for path in [tree, *tree.rglob("*")] if tree.exists() else []:
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile: it shows as changed
                state[path] = path.lstat().st_mtime_ns
    return state


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_BEFORE] = _watched_state()


@pytest.hookimpl(trylast=True)  # after the session's fixtures are torn down and their servers stopped
def pytest_sessionfinish(session: pytest.Session) -> None:
    before, after = session.config.stash[_BEFORE], _watched_state()
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p, -1) != after.get(p, -1))
    if changed:
        session.config.stash[_CHANGED] = changed
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    if changed := config.stash.get(_CHANGED, []):
        terminalreporter.write_sep("=", "FAILED: the session wrote outside its temporary directories", red=True)
        for path in changed:
            terminalreporter.write_line(f"created, changed or removed: {path}")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ["SWITCHBOARD_TEST_CACHES"], ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny float32 Llama with grouped-query attention and the demo tokenizer."""
    return build_demo_model(tmp_path_factory.mktemp("tiny-model"), tiny_spec())


def peft_configs() -> dict[str, tuple[PeftConfig, int]]:
    """name -> (config, seed). Eight adapters over the four kinds."""
    return {
        "lora": (LoraConfig(r=8, lora_alpha=16, target_modules=list(ALL_LINEAR), init_lora_weights=False), 1),
        "lora-rslora": (
            LoraConfig(r=4, lora_alpha=8, target_modules=list(ALL_LINEAR), use_rslora=True, init_lora_weights=False),
            2,
        ),
        "lokr-full": (
            LoKrConfig(r=16, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False),
            3,
        ),
        "lokr-decomposed": (
            LoKrConfig(
                r=2,
                alpha=4,
                target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
                decompose_both=True,
                init_weights=False,
            ),
            4,
        ),
        "ia3": (
            IA3Config(
                target_modules=["k_proj", "v_proj", "down_proj"],
                feedforward_modules=["down_proj"],
                init_ia3_weights=False,
            ),
            5,
        ),
        "prefix": (PrefixTuningConfig(num_virtual_tokens=8, task_type="CAUSAL_LM"), 6),
        "prefix-b": (PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"), 7),
        "lora-qv": (LoraConfig(r=16, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False), 8),
    }


@pytest.fixture(scope="session")
def peft_adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        name: build_adapter(tiny_model_dir, config, tmp_path_factory.mktemp(f"adapter-{name}"), seed)
        for name, (config, seed) in peft_configs().items()
    }
