"""The README and docs/ link only to files that exist, and the README stays a page for users (about 150 lines)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def test_every_relative_link_resolves() -> None:
    broken = []
    for doc in DOCS:
        for target, _ in LINK.findall(doc.read_text()):
            if "://" not in target and not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken


def test_every_doc_is_linked_from_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    assert [d.name for d in DOCS[1:] if f"(docs/{d.name})" not in readme] == []


def test_the_readme_fits_about_150_lines() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 160


def test_the_readme_names_every_command_of_the_cli() -> None:
    import subprocess
    import sys

    help_text = subprocess.run(
        [sys.executable, "-m", "switchboard.serving.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    commands = re.search(r"\{([a-z,-]+)\}", help_text).group(1).split(",")
    block = (ROOT / "README.md").read_text().split("## Command line", 1)[1].split("## ", 1)[0]
    named = set(re.findall(r"switchboard ([a-z-]+)", block)) | set(re.findall(r"\| ([a-z-]+)", block))
    assert sorted(set(commands) - named) == []


def test_the_readme_says_of_every_request_field_whether_it_is_applied_or_refused() -> None:
    """Issue 19: no field a client can send is silently ignored; the README's table names each one."""
    from switchboard.serving.api.schemas import ChatCompletionRequest, CompletionRequest

    section = (ROOT / "README.md").read_text().split("## OpenAI API", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ")}
    named = set(re.findall(r"`([a-z_]+)", rows["applied"] + rows["refused"]))
    named |= {f"guided_{suffix}" for suffix in ("regex", "choice", "grammar")}  # written `guided_json` / `_regex`
    context = {"model", "prompt", "messages", "stream", "adapter_id"}  # the request itself, in the API's text
    fields = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
    assert sorted(fields - named - context) == []
