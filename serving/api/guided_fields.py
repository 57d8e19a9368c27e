"""The structured-output fields of both generation routes, and the one `GuidedSpec` they ask for.

OpenAI's `response_format` (`json_object`, `json_schema`; `text` means none), vLLM's `guided_json`, `guided_regex`,
`guided_choice` and `guided_grammar`, and vLLM's newer `structured_outputs` object with the same five meanings. At
most one may ask for a grammar; a second one is refused (400) rather than one of them silently winning.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from switchboard.serving.api.errors import bad_request
from switchboard.serving.engine.guided import GuidedKind, GuidedSpec

_STRICT = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
Schema = dict[str, Any] | bool
Choices = Annotated[list[str], Field(min_length=1, fail_fast=True)]


class JsonSchemaFormat(BaseModel):
    model_config = _STRICT

    name: str | None = None  # OpenAI requires a name; it changes nothing here
    description: str | None = None
    schema_: Schema | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the output always follows the schema strictly


class ResponseFormat(BaseModel):
    model_config = _STRICT

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` (its successor of the `guided_*` fields)."""

    model_config = _STRICT

    json_: Schema | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: Choices | None = None
    grammar: str | None = None
    json_object: bool | None = None


class GuidedFields(BaseModel):
    """Mixed into the request bodies (`schemas.SamplingFields`)."""

    model_config = _STRICT

    response_format: ResponseFormat | None = None
    guided_json: Schema | str | None = None  # vLLM: a schema, or its JSON text
    guided_regex: str | None = None
    guided_choice: Choices | None = None
    guided_grammar: str | None = None  # xgrammar's EBNF (GBNF-like) with a `root` rule
    structured_outputs: StructuredOutputs | None = None
    guided_whitespace_pattern: str | None = None  # refused: JSON is generated compactly

    def guided_spec(self) -> tuple[str, GuidedSpec] | None:
        """The grammar the request asks for and the field that asks, or None; 400 when it asks for several or for
        one badly."""
        if self.guided_whitespace_pattern is not None:
            raise bad_request(
                "`guided_whitespace_pattern` is not supported: JSON is generated without free whitespace.",
                param="guided_whitespace_pattern",
            )
        asked: list[tuple[str, GuidedSpec]] = []
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            asked.append(("response_format", GuidedSpec(GuidedKind.JSON_OBJECT)))
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise bad_request(
                    "`response_format` of type `json_schema` needs `json_schema.schema`.", param="response_format"
                )
            asked.append(("response_format", _schema_spec(fmt.json_schema.schema_, "response_format")))
        asked += _vllm_specs(
            "guided_", self.guided_json, self.guided_regex, self.guided_choice, self.guided_grammar, None
        )
        so = self.structured_outputs
        if so is not None:
            asked += _vllm_specs("structured_outputs.", so.json_, so.regex, so.choice, so.grammar, so.json_object)
        if len(asked) > 1:
            names = ", ".join(f"`{name}`" for name, _ in asked)
            raise bad_request(f"Only one structured-output field may be set; got {names}.", param=asked[1][0])
        return asked[0] if asked else None


def _vllm_specs(
    prefix: str,
    schema: Schema | str | None,
    regex: str | None,
    choice: list[str] | None,
    grammar: str | None,
    json_object: bool | None,
) -> list[tuple[str, GuidedSpec]]:
    """The specs of vLLM's five fields, named `prefix` + json, regex, choice, grammar, json_object."""
    specs = []
    if schema is not None:
        specs.append((prefix + "json", _schema_spec(schema, prefix + "json")))
    if regex is not None:
        specs.append((prefix + "regex", GuidedSpec(GuidedKind.REGEX, regex)))
    if choice is not None:
        specs.append((prefix + "choice", GuidedSpec(GuidedKind.CHOICE, json.dumps(choice))))
    if grammar is not None:
        specs.append((prefix + "grammar", GuidedSpec(GuidedKind.GRAMMAR, grammar)))
    if json_object:
        specs.append((prefix + "json_object", GuidedSpec(GuidedKind.JSON_OBJECT)))
    return specs


def _schema_spec(schema: Schema | str, param: str) -> GuidedSpec:
    """A JSON Schema as compact JSON text (so that equal schemas share one cache entry; key order is kept, as it
    orders the generated properties)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise bad_request(f"`{param}` is not valid JSON: {exc}", param=param) from exc
        if not isinstance(schema, dict | bool):
            raise bad_request(f"`{param}` must be a JSON Schema: an object or a boolean.", param=param)
    return GuidedSpec(GuidedKind.JSON_SCHEMA, json.dumps(schema, separators=(",", ":"), ensure_ascii=False))
