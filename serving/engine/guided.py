"""Structured output: a request's grammar, one matcher per sequence, and each step's token masks over the batch.

A request asks for a JSON Schema, any JSON object, a regular expression, one of a list of strings, or an EBNF grammar
(`GuidedSpec`). `GrammarCompiler` turns it into xgrammar's compiled grammar once (the API calls it off the event
loop; results are cached by the spec's text), every choice of the request gets its own `GuidedState` (a matcher
that advances with each sampled token), and before each sample `token_masks` fills one bitmask row per guided
sequence, which the sampler applies (`apply_token_masks`). The grammar's stop tokens are the engine's EOS ids: once
the grammar is complete only they stay allowed, and accepting one ends the sequence (finish reason "stop").

JSON is generated compactly (`", "` and `": "` between items, no other whitespace): with free whitespace a model,
and every random test model, can fill `max_tokens` with blanks inside a valid document.
"""

from __future__ import annotations

import enum
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import xgrammar as xgr
from transformers import PreTrainedTokenizerBase

CACHE_ENTRIES = 256  # compiled grammars kept (least recently used dropped); identical specs reuse one
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


class GuidedKind(enum.StrEnum):
    JSON_SCHEMA = "json_schema"  # source: the schema as JSON text
    JSON_OBJECT = "json_object"  # any JSON object; source unused
    REGEX = "regex"  # source: the regular expression
    CHOICE = "choice"  # source: a JSON list of the strings to choose from
    GRAMMAR = "grammar"  # source: an EBNF grammar (xgrammar's, GBNF-like, with a `root` rule)


@dataclass(frozen=True, slots=True)
class GuidedSpec:
    """What a request asks the output to match; plain text, so it is hashable and cacheable."""

    kind: GuidedKind
    source: str = ""


class GuidedError(ValueError):
    """The spec cannot be compiled (an invalid schema, regex or grammar); the message is for the client."""


@dataclass(frozen=True, slots=True, eq=False)
class Grammar:
    """A compiled grammar, shared by every sequence of the requests that asked for `spec`."""

    spec: GuidedSpec
    compiled: xgr.CompiledGrammar


def choice_grammar(choices: list[str]) -> str:
    """The EBNF grammar that matches exactly one of `choices` (each written as an escaped EBNF string literal)."""
    return "root ::= " + " | ".join(_ebnf_literal(c) for c in choices)


def _ebnf_literal(text: str) -> str:
    out = []
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


class GrammarCompiler:
    """Compiles specs against one tokenizer and vocabulary; thread-safe. The tokenizer's tables are built on the
    first compile (about 0.5 s for a 49k vocabulary), not at start-up, so servers that never see a guided request
    never pay for them."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.vocab_size = vocab_size  # the model's logits width, which the bitmasks cover
        self._tokenizer = tokenizer
        self._stop_token_ids = sorted(stop_token_ids)
        self._compiler: xgr.GrammarCompiler | None = None
        self._cache: OrderedDict[GuidedSpec, Grammar] = OrderedDict()
        self._lock = threading.Lock()
        self.num_compiled = 0  # compilations done (cache misses)

    def _xgr(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self.vocab_size, stop_token_ids=self._stop_token_ids
                )
                # One thread: compiling is rare (cached) and runs beside the engine's step thread on few cores.
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def compile(self, spec: GuidedSpec) -> Grammar:
        """The compiled grammar of `spec`, from the cache when it was compiled before; GuidedError if invalid."""
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        compiler = self._xgr()
        try:
            compiled = _compile(compiler, spec)
        except RuntimeError as exc:  # xgrammar reports every invalid input so
            raise GuidedError(_LOG_PREFIX.sub("", str(exc)).strip()) from exc
        if not _first_tokens(compiled, self.vocab_size).any():
            raise GuidedError("the grammar matches no text that this model's tokens can write")
        grammar = Grammar(spec, compiled)
        with self._lock:
            self.num_compiled += 1
            self._cache[spec] = grammar
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return grammar


# xgrammar 0.2.9 writes the characters of a string with minLength or maxLength as `[^"\\\r\n]`, which lets raw
# control characters (U+0000-U+001F) into the string: invalid JSON. We replace that class by JSON's own (escapes stay
# out of such strings, as xgrammar has them: they would count towards the length).
_LENGTH_STRING_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\]"


def _json_grammar(schema: str, *, strict: bool) -> xgr.Grammar:
    grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=strict)
    ebnf = str(grammar)
    if _LENGTH_STRING_CHAR not in ebnf:
        return grammar
    return xgr.Grammar.from_ebnf(ebnf.replace(_LENGTH_STRING_CHAR, _JSON_STRING_CHAR))


def _compile(compiler: xgr.GrammarCompiler, spec: GuidedSpec) -> xgr.CompiledGrammar:
    match spec.kind:
        case GuidedKind.JSON_SCHEMA:
            return compiler.compile_grammar(_json_grammar(spec.source, strict=True))
        case GuidedKind.JSON_OBJECT:
            # Not strict: strict mode forbids properties a schema does not name, and this one names none.
            return compiler.compile_grammar(_json_grammar('{"type": "object"}', strict=False))
        case GuidedKind.REGEX:
            return compiler.compile_regex(spec.source)
        case GuidedKind.CHOICE:
            return compiler.compile_grammar(choice_grammar(json.loads(spec.source)))
        case GuidedKind.GRAMMAR:
            return compiler.compile_grammar(spec.source)


def _first_tokens(compiled: xgr.CompiledGrammar, vocab_size: int) -> torch.Tensor:
    """The bitmask [1, W] of the tokens a grammar allows first."""
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    xgr.GrammarMatcher(compiled).fill_next_token_bitmask(bitmask, 0)
    return bitmask


class GuidedState:
    """One sequence's place in its grammar."""

    def __init__(self, grammar: Grammar) -> None:
        self.matcher = xgr.GrammarMatcher(grammar.compiled)
        # The grammar allows no next token (a schema that cannot be satisfied past this point): its mask then allows
        # the stop tokens, and the next token ends the sequence where the grammar stopped.
        self.stuck = False

    def advance(self, token: int) -> bool:
        """Accept the sampled token; whether the grammar has ended (a stop token after a complete match). A token
        the mask forbade is an engine bug: it raises, and the engine ends that sequence alone."""
        if self.stuck:
            return True
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"the grammar rejected token {token}, which its mask allowed")
        return self.matcher.is_terminated()


@dataclass(frozen=True, slots=True)
class TokenMasks:
    """The allowed tokens of one step's guided rows.

    bitmask: [N, ceil(V / 32)] int32 on the CPU, one row per sampled sequence; bit t % 32 of word t // 32 set means
             token t is allowed (xgrammar's layout). Rows of unguided sequences are left all ones.
    rows:    the guided rows, ascending; never empty.
    """

    bitmask: torch.Tensor
    rows: list[int]


_BATCH = xgr.BatchGrammarMatcher(max_threads=1)


def token_masks(states: list[GuidedState | None], vocab_size: int) -> TokenMasks | None:
    """Each guided sequence's next-token bitmask (None when no sequence of the batch is guided)."""
    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return None
    bitmask = xgr.allocate_token_bitmask(len(states), vocab_size)
    guided = [s for s in states if s is not None]
    _BATCH.batch_fill_next_token_bitmask([s.matcher for s in guided], bitmask, indices=rows)
    stuck = (bitmask[rows] == 0).all(-1).tolist()
    for row, state, is_stuck in zip(rows, guided, stuck, strict=True):
        if is_stuck:
            state.stuck = True
            for token in state.matcher.stop_token_ids:
                _allow(bitmask, row, token)
    return TokenMasks(bitmask, rows)


def _allow(bitmask: torch.Tensor, row: int, token: int) -> None:
    bit = token % 32
    bitmask[row, token // 32] |= (1 << bit) if bit < 31 else -(1 << 31)  # int32: bit 31 is the sign


def apply_token_masks(logits: torch.Tensor, masks: TokenMasks | None) -> torch.Tensor:
    """Semantics: out = logits.clone(); for i in masks.rows: for t in range(V): if bit t of masks.bitmask[i] is 0:
    out[i, t] = -inf. `logits` itself is left as it is (logprobs are reported from the model's own distribution).

    logits: [N, V] float32, N the rows of `masks.bitmask`. Returns `logits` itself when `masks` is None.

    xgrammar's kernel (C++ on the CPU, Triton on CUDA) is 3-15x faster here than unpacking the bits with torch ops
    (bench/guided.py), but on the CPU it writes past the logits when V is not a multiple of 32 (heap corruption
    with V = 1, xgrammar 0.2.9): such vocabularies take the torch path. Llama-family vocabularies are padded to a
    multiple of 32 or more."""
    if masks is None:
        return logits
    out = logits.clone()
    bitmask = masks.bitmask.to(logits.device, non_blocking=True)
    vocab = logits.shape[-1]
    if vocab % 32 == 0:
        xgr.apply_token_bitmask_inplace(out, bitmask, vocab_size=vocab, indices=masks.rows)
    else:
        rows = torch.tensor(masks.rows, device=logits.device)
        bits = (bitmask[rows].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32, device=logits.device)) & 1
        allowed = bits.view(len(masks.rows), -1)[:, :vocab].bool()  # [R, V]
        out[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
    return out
