"""The regular expressions of an `adapter_config.json`, matched against module names in linear time.

PEFT (0.21) reads these fields as Python regular expressions against a module's name in the base model, such as
`model.layers.3.self_attn.q_proj`:
- `rank_pattern`, `alpha_pattern`: the value of the first key `p` with `re.match(rf"(.*\\.)?({p})$", name)`
  (`peft.utils.other.get_pattern_key`);
- `target_modules`, `exclude_modules`, (IA)3's `feedforward_modules`, when a string: `re.fullmatch(p, name)`;
- `layers_pattern` (a string or a list, with `layers_to_transform`): the layer index is group `idx` of the first `p`
  with `re.match(rf"(?:^|.*?\\.){p}\\.(?P<idx>\\d+)\\.", name)` (`tuners_utils.check_target_module_exists`).

Python's engine backtracks: the upload `rank_pattern: {"model\\.([\\w.]+)+!": 8}` took seconds per module name,
holding the interpreter lock. Here Python's own parser reads each pattern as PEFT composes it, so it means exactly
what it means to PEFT; the parse tree is written out in RE2's syntax, and RE2 matches it in time linear in the name.
Refused, with an AdapterError naming the field and the pattern: what Python cannot parse (PEFT would fail on it too),
what RE2 cannot run (backreferences, lookaround, atomic groups, possessive and over-1000 repeats), a pattern over
MAX_PATTERN_CHARS, a field with over MAX_PATTERNS entries, and a config whose patterns take over PATTERN_BUDGET_S of
compiling and matching against the base model's module names.

The translation is exact on module names, which are ASCII without newlines: Python's Unicode `\\d` and `\\w` agree
with RE2's on ASCII (its `\\s` is written out, as Python's also holds \\v and \\x1c-\\x1f), and Python's `$` differs
from RE2's only before a final newline. The one case folding that differs on ASCII (Python folds U+0130 and U+0131
onto `i`, RE2 does not) is refused.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from re import _constants as sre  # Python's own regex parser (private, the same in 3.11-3.14)
from re import _parser as sre_parse
from typing import Any

import re2

from switchboard.adapters_store.kinds.base import CONFIG_FILE, AdapterError

MAX_PATTERN_CHARS = 1_000
MAX_PATTERNS = 1_000  # per field: pattern keys, or names in a list
# Compiling and matching all of one config's patterns; PEFT configs that name every module of an 80-layer model
# one by one take a fraction of it.
PATTERN_BUDGET_S = 2.0
RE2_MAX_MEM = 1 << 20  # per compiled pattern (program and DFA cache); past it RE2 refuses or falls back to its NFA

# How PEFT embeds a user's pattern `p` (the placeholder `{}`) in the expression it matches.
KEY_TEMPLATE = r"(.*\.)?({})$"  # rank_pattern, alpha_pattern: re.match
FULL_TEMPLATE = "{}"  # target_modules, exclude_modules, feedforward_modules: re.fullmatch
LAYER_TEMPLATE = r"(?:^|.*?\.){}\.(?P<idx>\d+)\."  # layers_pattern: re.match, then group idx

_FLAG_LETTERS = {re.IGNORECASE: "i", re.MULTILINE: "m", re.DOTALL: "s"}
_ANCHORS = {
    sre.AT_BEGINNING: "^",
    sre.AT_END: "$",
    sre.AT_BEGINNING_STRING: r"\A",
    sre.AT_END_STRING: r"\z",
    sre.AT_BOUNDARY: r"\b",
    sre.AT_NON_BOUNDARY: r"\B",
}
# Python's classes as they act on ASCII, inside a bracket expression.
_CLASSES = {
    sre.CATEGORY_DIGIT: r"\d",
    sre.CATEGORY_NOT_DIGIT: r"\D",
    sre.CATEGORY_WORD: r"\w",
    sre.CATEGORY_NOT_WORD: r"\W",
    sre.CATEGORY_SPACE: r"\x{9}-\x{d}\x{1c}-\x{20}",
    sre.CATEGORY_NOT_SPACE: r"\x{0}-\x{8}\x{e}-\x{1b}\x{21}-\x{10ffff}",
}
_UNSUPPORTED = {
    sre.GROUPREF: "backreferences",
    sre.GROUPREF_EXISTS: "conditional backreferences",
    sre.ASSERT: "lookahead and lookbehind",
    sre.ASSERT_NOT: "lookahead and lookbehind",
    sre.ATOMIC_GROUP: "atomic groups",
    sre.POSSESSIVE_REPEAT: "possessive repeats",
}
_DOTTED_I = (0x130, 0x131)  # Python's IGNORECASE folds them onto "i", RE2's does not


@dataclass(frozen=True, slots=True)
class CompiledPattern:
    """One pattern of a field, as given, and the RE2 program of what PEFT matches for it."""

    pattern: str
    regex: Any  # re2._Regexp
    idx_group: int | None  # the group number of LAYER_TEMPLATE's `idx`


class ConfigPatterns:
    """The pattern fields of one `adapter_config.json`: each field compiled once, on first use, and all of them
    compiled and matched within one budget of `budget_s` seconds (PATTERN_BUDGET_S unless given)."""

    def __init__(self, config: dict[str, Any], budget_s: float | None = None) -> None:
        self.config = config
        self.budget_s = PATTERN_BUDGET_S if budget_s is None else budget_s
        self._spent = 0.0
        self._compiled: dict[str, list[CompiledPattern]] = {}

    def names_or_regex(self, field: str) -> str | list[str] | None:
        """A `target_modules`-like field: absent, a regex, or a list of at most MAX_PATTERNS names."""
        value = self.config.get(field)
        if not (value is None or isinstance(value, str) or _is_names(value)):
            raise AdapterError(f"{field} must be a list of names or a regex, got {_shown(value)}", CONFIG_FILE)
        if isinstance(value, list) and len(value) > MAX_PATTERNS:
            raise AdapterError(f"{field} lists {len(value)} names; at most {MAX_PATTERNS}", CONFIG_FILE)
        return value

    def fullmatch(self, field: str, key: str) -> bool:
        """`re.fullmatch(config[field], key)` for a field that holds one regex."""
        (compiled,) = self._field(field, [self.config[field]], FULL_TEMPLATE)
        started = time.monotonic()
        found = compiled.regex.fullmatch(key) is not None
        self._charge(field, started)
        return found

    def value(self, field: str, key: str, default: Any) -> Any:
        """`rank_pattern` / `alpha_pattern`: the value of the first key that matches module `key`, else `default`."""
        patterns = self.config.get(field)
        if patterns is None:
            return default
        if not isinstance(patterns, dict):
            raise AdapterError(f"{field} must be an object, got {type(patterns).__name__}", CONFIG_FILE)
        compiled_patterns = self._field(field, list(patterns), KEY_TEMPLATE)
        started = time.monotonic()
        for compiled in compiled_patterns:
            if compiled.regex.match(key) is not None:
                self._charge(field, started)
                return patterns[compiled.pattern]
            started = self._charge(field, started)
        return default

    def number(self, field: str, key: str, default: float) -> float:
        """`value` for a scale such as alpha: a finite number."""
        value = self.value(field, key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise AdapterError(f"{field} gives {key} the value {value!r}; expected a finite number", CONFIG_FILE)
        return float(value)

    def layer_index(self, key: str) -> int | None:
        """The layer index PEFT reads from module `key` for `layers_to_transform`: by `layers_pattern` if set, else
        the first number after a name (for `model.layers.{i}.` that is i); None when no pattern finds one."""
        layers_pattern = self.config.get("layers_pattern")
        if not layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)  # PEFT's default; a fixed pattern, linear here
            return int(match["idx"]) if match else None
        given = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        if not _is_names(given):
            raise AdapterError(f"layers_pattern must be a string or a list of them, got {_shown(given)}", CONFIG_FILE)
        compiled_patterns = self._field("layers_pattern", given, LAYER_TEMPLATE)
        started = time.monotonic()
        for compiled in compiled_patterns:
            match = compiled.regex.match(key)
            started = self._charge("layers_pattern", started)
            if match is not None:
                index = match.group(compiled.idx_group)
                return None if index is None else int(index)
        return None

    def _field(self, field: str, patterns: list[str], template: str) -> list[CompiledPattern]:
        if field not in self._compiled:
            if len(patterns) > MAX_PATTERNS:
                raise AdapterError(f"{field} has {len(patterns)} patterns; at most {MAX_PATTERNS}", CONFIG_FILE)
            compiled = []
            started = time.monotonic()
            for pattern in patterns:
                compiled.append(compile_pattern(field, pattern, template))
                started = self._charge(field, started)
            self._compiled[field] = compiled
        return self._compiled[field]

    def _charge(self, field: str, started: float) -> float:
        """Count the time since `started` against the budget, refusing past it; returns the time now."""
        now = time.monotonic()
        self._spent += now - started
        if self._spent >= self.budget_s:
            raise AdapterError(
                f"compiling and matching {field} against the base model's module names took {self.budget_s:g} s or "
                "more; use fewer or simpler patterns",
                CONFIG_FILE,
            )
        return now


def compile_pattern(field: str, pattern: Any, template: str) -> CompiledPattern:
    """RE2's program for what PEFT matches when `field` holds `pattern`: `template` with the pattern in it, as
    Python's parser reads it. Raises AdapterError naming the field and the pattern when it cannot be run as is."""
    if not isinstance(pattern, str):
        raise AdapterError(f"{field} patterns must be strings, got {_shown(pattern)}", CONFIG_FILE)
    if len(pattern) > MAX_PATTERN_CHARS:
        problem = f"{field} pattern {_shown(pattern)} is {len(pattern)} characters long; at most {MAX_PATTERN_CHARS}"
        raise AdapterError(problem, CONFIG_FILE)
    try:
        tree = sre_parse.parse(template.format(pattern))
    except re.error as exc:
        problem = f"{field} pattern {_shown(pattern)} is not a valid regular expression ({exc})"
        raise AdapterError(problem, CONFIG_FILE) from exc
    except RecursionError as exc:
        raise AdapterError(f"{field} pattern {_shown(pattern)} nests too deeply", CONFIG_FILE) from exc
    try:
        translated = _global_flags(tree.state.flags) + _emit(tree, tree.state.flags)
    except _Unsupported as exc:
        raise AdapterError(f"{field} pattern {_shown(pattern)} is not supported: {exc}", CONFIG_FILE) from None
    except RecursionError as exc:
        raise AdapterError(f"{field} pattern {_shown(pattern)} nests too deeply", CONFIG_FILE) from exc
    options = re2.Options()
    options.max_mem = RE2_MAX_MEM
    options.log_errors = False  # an upload must not write to the server's log on every match
    try:
        regex = re2.compile(translated, options)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        problem = f"{field} pattern {_shown(pattern)} is not supported by the linear-time engine RE2 ({reason})"
        raise AdapterError(problem, CONFIG_FILE) from None
    return CompiledPattern(pattern, regex, tree.state.groupdict.get("idx"))


class _Unsupported(Exception):
    """A construct RE2 cannot run, or would read differently from Python."""


def _emit(items: sre_parse.SubPattern | list[tuple[Any, Any]], flags: int) -> str:
    """The RE2 syntax for Python's parse tree `items`, under Python flags `flags` (for the IGNORECASE check)."""
    out = []
    for op, av in items:
        if op in _UNSUPPORTED:
            raise _Unsupported(f"{_UNSUPPORTED[op]} cannot be matched in linear time")
        if op is sre.LITERAL:
            _check_fold(av, av, flags)
            out.append(_char(av))
        elif op is sre.NOT_LITERAL:
            _check_fold(av, av, flags)
            out.append(f"[^{_char(av)}]")
        elif op is sre.ANY:
            out.append(".")
        elif op is sre.IN:
            out.append(_class(av, flags))
        elif op is sre.AT:
            out.append(_ANCHORS[av])
        elif op is sre.BRANCH:
            out.append("(?:" + "|".join(_emit(alternative, flags) for alternative in av[1]) + ")")
        elif op is sre.MAX_REPEAT or op is sre.MIN_REPEAT:
            low, high, sub = av
            count = f"{{{low},}}" if high == sre.MAXREPEAT else f"{{{low}}}" if low == high else f"{{{low},{high}}}"
            out.append(f"(?:{_emit(sub, flags)}){count}" + ("?" if op is sre.MIN_REPEAT else ""))
        elif op is sre.SUBPATTERN:
            group, add, remove, sub = av
            inner = _scoped_flags(add, remove, _emit(sub, (flags | add) & ~remove))
            out.append(inner if group is None else f"({inner})")  # every capture group stays, so numbers agree
        else:
            raise _Unsupported(f"the construct {op} is not supported")
    return "".join(out)


def _class(items: list[tuple[Any, Any]], flags: int) -> str:
    body = []
    for op, av in items:
        if op is sre.NEGATE:
            body.append("^")
        elif op is sre.LITERAL:
            _check_fold(av, av, flags)
            body.append(_char(av))
        elif op is sre.RANGE:
            _check_fold(av[0], av[1], flags)
            body.append(f"{_char(av[0])}-{_char(av[1])}")
        elif op is sre.CATEGORY:
            body.append(_CLASSES[av])
        else:
            raise _Unsupported(f"the class item {op} is not supported")
    return "[" + "".join(body) + "]"


def _char(code: int) -> str:
    return chr(code) if chr(code).isascii() and chr(code).isalnum() else f"\\x{{{code:x}}}"


def _check_fold(low: int, high: int, flags: int) -> None:
    """Refuse characters low..high under IGNORECASE when they hold one that Python and RE2 fold differently."""
    if flags & re.IGNORECASE and any(low <= code <= high for code in _DOTTED_I):
        raise _Unsupported("U+0130 and U+0131 ignoring case (Python and RE2 fold them differently)")


def _letters(flags: int) -> str:
    return "".join(letter for flag, letter in _FLAG_LETTERS.items() if flags & flag)


def _global_flags(flags: int) -> str:
    return f"(?{_letters(flags)})" if _letters(flags) else ""


def _scoped_flags(add: int, remove: int, inner: str) -> str:
    on, off = _letters(add), _letters(remove)
    if not (on or off):
        return f"(?:{inner})"
    return f"(?{on}{'-' + off if off else ''}:{inner})"


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _shown(value: Any, limit: int = 100) -> str:
    """`value` as an error message quotes it: its repr, cut after `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
