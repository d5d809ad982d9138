"""The operations of the vendor doors' handlers whose modules do not declare their own (OpenAI's chat
completions, models and responses, Anthropic's messages): handed to the contract with `describe`.
Their request bodies are the document's ready schemas (named components) until the doors decode
through structs; a module that declares `@operation` on its handler replaces its entry here."""

from __future__ import annotations

from gateway.api.anthropic import messages
from gateway.api.openai import chat_completions, responses
from gateway.contract.anthropic import AnthropicMessage, AnthropicTokenCount, CountTokensRequest, MessagesRequest
from gateway.contract.openai import ChatCompletion, ChatCompletionRequest, Model, ModelList
from gateway.contract.operations import (
    ANTHROPIC_SECURITY,
    Operation,
    anthropic_error_answers,
    describe,
    errors,
    json_content,
    ok,
    openai_error_answers,
    path_string,
    query,
    response,
    sse_content,
)
from gateway.contract.responses import CreateResponse, Response, ResponseDeleted, ResponseItemList

INT32_MAX = 2**31 - 1
RESPONSE_ID = path_string("response_id", "The response's id (resp_<hex>)")
DB_DOWN = {"503": {"$ref": "#/components/responses/Error503"}}


def describe_vendor_handlers() -> None:
    """Register the operations (idempotent: the route table calls it each time it is built)."""
    describe(chat_completions.chat_completions, Operation(
        "OpenAI-compatible chat completion (stream and non-stream)", "openai",
        {"200": response("The completion; `chat.completion.chunk` events when `stream` is true",
                         {**json_content(ChatCompletion), **sse_content("ChatCompletionEvent")}),
         **openai_error_answers(400, 401, 403, 404, 413, 429)},
        body=ChatCompletionRequest,
        description="Stateless like OpenAI's endpoint: no thread or message rows; usage is recorded. "
                    "Errors are in OpenAI's shape (a database outage answers the native 503)."))
    describe(chat_completions.list_models, Operation(
        "The enabled models, OpenAI-style", "openai",
        {**ok(200, "The models", ModelList), **errors(401, openai=True), **DB_DOWN}))
    describe(chat_completions.get_model, Operation(
        "One enabled model, OpenAI-style", "openai",
        {**ok(200, "The model", Model), **errors(401, 404, openai=True), **DB_DOWN},
        parameters=[path_string("model")]))
    describe(responses.create_response, Operation(
        "OpenAI Responses API: create a response (stream and non-stream)", "openai",
        {"200": response("The response; its semantic events when `stream` is true",
                         {**json_content(Response), **sse_content("ResponseEvent")}),
         **openai_error_answers(400, 401, 403, 404, 413, 429)},
        body=CreateResponse,
        description="With store: true (the default) the turn is persisted in a thread like POST /api/chat's; "
                    "previous_response_id continues it. With store: false it is stateless like "
                    "/v1/chat/completions. Errors are in OpenAI's shape."))
    describe(responses.get_response, Operation(
        "A stored response, rebuilt from its reply; with stream=true its semantic events", "openai",
        {"200": response("The response; with `stream=true` its semantic events, replayed (or followed live) "
                         "after `starting_after`",
                         {**json_content(Response), **sse_content("ResponseEvent")}),
         **errors(400, 401, 403, 404, openai=True), **DB_DOWN},
        parameters=[RESPONSE_ID, query("stream", {"enum": ["true", "false", "1", "0"]}, "Stream the events"),
                    query("starting_after", {"type": "integer", "minimum": -1, "maximum": INT32_MAX},
                          "Resume after this sequence_number")]))
    describe(responses.delete_response, Operation(
        "Delete a stored response's turn (and its thread when nothing else is left; usage is kept)", "openai",
        {**ok(200, "Deleted", ResponseDeleted), **errors(401, 403, 404, openai=True), **DB_DOWN},
        parameters=[RESPONSE_ID]))
    describe(responses.list_input_items, Operation(
        "A stored response's input items (its user message; other items were for the turn only)", "openai",
        {**ok(200, "A cursor page of input items", ResponseItemList), **errors(400, 401, 403, 404, openai=True),
         **DB_DOWN},
        parameters=[RESPONSE_ID,
                    query("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}, "Page size"),
                    query("order", {"enum": ["asc", "desc"], "default": "desc"}, "Order"),
                    query("after", {"type": "string"}, "List the items after this item id")]))
    describe(messages.create_message, Operation(
        "Anthropic Messages API (stream and non-stream)", "anthropic",
        {"200": response("The message; Anthropic's stream events when `stream` is true: `message_start`, "
                         "`content_block_start`, `ping`, `content_block_delta`..., `content_block_stop`, "
                         "`message_delta` (stop reason, usage), `message_stop`; or an `error` event",
                         {**json_content(AnthropicMessage), **sse_content("AnthropicStreamEvent")}),
         **anthropic_error_answers(400, 401, 403, 404, 413, 429, 502, 504, 529)},
        body=MessagesRequest, security=ANTHROPIC_SECURITY,
        description="Stateless: no thread or message rows; usage is recorded once. The key goes in "
                    "`x-api-key` or `Authorization: Bearer`; `anthropic-version` is accepted, whatever "
                    "its value. Any configured model answers (OpenAI-compatible ones are translated). "
                    "Errors are in Anthropic's shape (a database outage answers the native 503)."))
    describe(messages.count_tokens, Operation(
        "The gateway's estimate of a Messages request's input tokens (what the policy reserves)", "anthropic",
        {**ok(200, "The estimate", AnthropicTokenCount), **anthropic_error_answers(400, 401, 403, 404, 413)},
        body=CountTokensRequest, security=ANTHROPIC_SECURITY))
