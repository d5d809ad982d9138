"""What an upstream sends, checked and normalised before it is streamed or stored.

An upstream is outside our control and its values end up in PostgreSQL: a number where text
belongs, a NUL (a `text` or `jsonb` value cannot hold U+0000), a token count of 2^63 or -5 (the
usage columns are `integer`, and a negative count would lower a user's daily total). The rules:

- text that is not a string is an `UpstreamProtocolError` (retryable before the first content
  byte, so the chain may fall back; after it, the reply ends as failed);
- U+0000 in any text becomes U+FFFD;
- invalid UTF-8 is decoded with replacement, as browsers decode an event stream (WHATWG SSE) and
  as httpx (under the OpenAI SDKs) does: an upstream that cuts a multi-byte character between
  tokens (llama.cpp has) still gives a readable reply instead of a failed one;
- a token count is an integer in [0, 2^31): a negative one becomes 0, a bigger one 2^31 - 1, a
  non-integer one 0 (a fractional one is rounded), and the report is flagged `suspect`. The
  usage row's total is an `integer` too: when the sum would not fit, the completion count is
  cut to what is left after the prompt's;
- what is charged (`charged`): the upstream's counts when they are believable, else the
  gateway's estimate, flagged `estimated` (and `suspect` when counts came but were not believed).
  Not believed: a suspect report, a completion above the bound the upstream was told (a compliant
  upstream never writes more), a prompt far above the estimate (see `believable`);
- the text of an error an upstream sent is scrubbed of the provider's secrets (`error_text`).
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from gateway.providers.base import (
    NO_SECRETS,
    ChatRequest,
    Secrets,
    UpstreamProtocolError,
    UsageReport,
    prompt_estimate,
    tokens_for_chars,
)

MAX_COUNT = 2**31 - 1  # PostgreSQL `integer`
NUL = "\x00"
REPLACEMENT = "\ufffd"
ERROR_CHARS = 500  # of an error's text from upstream
# A prompt count is believed up to this multiple of the estimate, plus PROMPT_ALLOWANCE. Byte-level
# tokenizers give at most a token a UTF-8 byte, four bytes a character and four characters an
# estimated token: 16x; the allowance covers what an upstream adds itself (a chat template, its
# own system prompt, a search plugin's results).
PROMPT_SLACK = 16
PROMPT_ALLOWANCE = 16_384


def loads(data: bytes) -> Any:
    """JSON from the wire; bytes that are not UTF-8 are decoded with replacement. Raises
    `orjson.JSONDecodeError` when it is not JSON either way."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        # the error path only: valid UTF-8 never gets here twice
        return orjson.loads(data.decode("utf-8", "replace"))


def clean(text: str) -> str:
    """`text` without NUL."""
    return text.replace(NUL, REPLACEMENT) if NUL in text else text


def text(value: object, what: str) -> str:
    """Reply text from the wire: "" when absent, NUL replaced; not a string is a protocol error."""
    if value.__class__ is str:
        return clean(value)
    if value is None:
        return ""
    raise UpstreamProtocolError(f"upstream sent {what} that is not a string ({type(value).__name__})")


def label(value: object, what: str) -> str | None:
    """A short code from the wire (a finish or stop reason): a string of at most 64 characters, or None."""
    if value is None or value == "":
        return None
    if value.__class__ is not str:
        raise UpstreamProtocolError(f"upstream sent {what} that is not a string ({type(value).__name__})")
    return clean(value[:64])


def obj(value: object, what: str) -> dict[str, Any]:
    """A JSON object from the wire ({} when absent); anything else is a protocol error."""
    if value.__class__ is dict:
        return value
    if value is None:
        return {}
    raise UpstreamProtocolError(f"upstream sent {what} that is not a JSON object ({type(value).__name__})")


def count(value: object) -> tuple[int, bool]:
    """A token count in [0, MAX_COUNT], and whether it had to be changed to get there (absent is 0)."""
    if value is None:
        return 0, False
    if value.__class__ is int:
        n: int = value
    elif value.__class__ is float and not math.isnan(value):
        f: float = value
        if math.isinf(f):
            return (MAX_COUNT if f > 0 else 0), True
        n = round(f)
        if n != f:
            return min(max(n, 0), MAX_COUNT), True
    else:  # a string, a bool, an object, NaN: not a count at all
        return 0, True
    if 0 <= n <= MAX_COUNT:
        return n, False
    return (0 if n < 0 else MAX_COUNT), True


def usage(prompt: object, completion: object) -> UsageReport:
    """A usage report from the upstream's raw counts, clamped and flagged when it had to be."""
    prompt_tokens, bad_prompt = count(prompt)
    completion_tokens, bad_completion = count(completion)
    if prompt_tokens + completion_tokens > MAX_COUNT:
        return UsageReport(prompt_tokens, MAX_COUNT - prompt_tokens, True)
    return UsageReport(prompt_tokens, completion_tokens, bad_prompt or bad_completion)


def believable(usage: UsageReport, request: ChatRequest) -> bool:
    """Whether an upstream's counts for `request` may be charged: in range (not `suspect`), a
    completion within the bound the upstream was told (when there was one), a prompt within
    PROMPT_SLACK times the gateway's estimate plus PROMPT_ALLOWANCE."""
    if usage.suspect or (request.max_tokens is not None and usage.completion_tokens > request.max_tokens):
        return False
    # the estimate is made only for a count past the allowance (most are not)
    return usage.prompt_tokens <= PROMPT_ALLOWANCE or (
        usage.prompt_tokens <= PROMPT_SLACK * prompt_estimate(request.messages, request.extra) + PROMPT_ALLOWANCE)


def charged(request: ChatRequest, reported: UsageReport | None, chars: int, consumed: bool = True) -> UsageReport:
    """What a reply is charged: the upstream's `reported` counts when believable, else the estimate
    (flagged `estimated`, and `suspect` when counts came but were not believed): the prompt of
    `request` (none when nothing was `consumed`: no attempt got content and none reported usage),
    and `chars` of reply, at most the bound the upstream was told."""
    if reported is not None and believable(reported, request):
        return reported
    prompt = prompt_estimate(request.messages, request.extra) if consumed or reported is not None else 0
    completion = tokens_for_chars(chars)
    if request.max_tokens is not None:
        # relayed text past the bound (an upstream that ignored it, cut at the chain's margin) is not charged
        completion = min(completion, request.max_tokens)
    return UsageReport(prompt, completion, suspect=reported is not None, estimated=True)


def error_text(text: str, secrets: Secrets = NO_SECRETS) -> str:
    """An error's text from what an upstream sent: its provider's secrets scrubbed (before the cut,
    which must not keep a secret's start), at most ERROR_CHARS, NUL replaced."""
    return clean(secrets.scrub(text)[:ERROR_CHARS])
