"""Structured output on the wire: OpenAI's `response_format` and vLLM's `guided_*` extras, turned
into one engine constraint (GuidedSpec) and compiled by the engine off its step thread.

`{"type": "json_object"}` is any JSON object; `{"type": "json_schema", "json_schema": {"name",
"schema", "strict"}}` follows the schema; vLLM's `guided_json` (a schema), `guided_regex` and
`guided_choice` are accepted too. One constraint per request; a schema the grammar library cannot
compile is the client's error: 400 naming the parameter, with the library's reason.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from chatglm_serve.engine.types import GuidedSpec
from chatglm_serve.server.errors import APIError

if TYPE_CHECKING:
    from chatglm_serve.engine.async_engine import AsyncEngine


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (
            self.json_schema is None or self.json_schema.schema_ is None
        ):
            raise ValueError("type 'json_schema' needs json_schema.schema")
        return self


class GuidedFields(BaseModel):
    """The structured-output fields a chat or completion request may carry."""

    response_format: ResponseFormat | None = None
    # vLLM extensions
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None

    def guided_spec(self) -> GuidedSpec | None:
        """The request's one constraint, or None (400 when it names more than one)."""
        specs: list[GuidedSpec] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            specs.append(GuidedSpec("json", '{"type": "object"}', "response_format"))
        elif rf is not None and rf.type == "json_schema":
            assert rf.json_schema is not None
            specs.append(GuidedSpec("json", _canonical(rf.json_schema.schema_), "response_format"))
        if self.guided_json is not None:
            schema = self.guided_json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise APIError(
                        400, f"guided_json is not valid JSON: {e}", param="guided_json"
                    ) from None
            specs.append(GuidedSpec("json", _canonical(schema), "guided_json"))
        if self.guided_regex is not None:
            specs.append(GuidedSpec("regex", self.guided_regex, "guided_regex"))
        if self.guided_choice is not None:
            specs.append(GuidedSpec("choice", json.dumps(self.guided_choice), "guided_choice"))
        if len(specs) > 1:
            raise APIError(
                400,
                "Only one of response_format (json_object / json_schema), guided_json, "
                "guided_regex and guided_choice may be given.",
                code="invalid_value",
                param=specs[1].param,
            )
        return specs[0] if specs else None


def _canonical(schema: Any) -> str:
    """One text per schema, whatever the key order: the compile cache's key."""
    return json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


async def compile_constraint(engine: AsyncEngine, body: GuidedFields) -> Any:
    """The compiled grammar for SamplingParams.guided, or None (GrammarError -> 400)."""
    spec = body.guided_spec()
    if spec is None:
        return None
    return await engine.compile_grammar(spec)
