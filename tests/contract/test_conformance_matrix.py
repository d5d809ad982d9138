"""The conformance matrix: every front door × every provider kind × each feature, end to end.

Each cell starts the real app with three models (one per provider kind, each on its own local
upstream), makes one request through the door as a client would (the official `openai` and
`anthropic` SDKs; raw HTTP for the native door), and asserts two things exactly: what the client
read back (an `Outcome`), and what reached the upstream (the features `arrived` found in the
provider's own shape, and no departure from its published request shape).

`TARGET` is what every cell should do; `TODAY` lists the cells that do something else now, each
with what it does and why. A cell leaves `TODAY` when the gateway starts doing its target (the
test then fails until the entry is removed), so the list is always the honest state of the
gateway. docs/conformance.md shows the same matrix, rendered from these tables (a test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.conformance import (
    CACHED_TOKENS,
    DOORS,
    DRIVERS,
    FEATURES,
    MODELS,
    PROMPT_TOKENS,
    PROVIDERS,
    SIGNATURE,
    THOUGHT,
    Outcome,
    arrived,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"


@dataclass(frozen=True)
class Expect:
    outcome: Outcome
    arrived: frozenset[str] | None  # None: nothing was sent upstream
    note: str = ""  # why a cell is not at its target (TODAY) or cannot work (TARGET)


NOTHING: frozenset[str] = frozenset()
TEXT = Outcome(text="Hello world", finish="stop", prompt_tokens=9, cached_tokens=0)
TOOL_CALL = Outcome(calls=[("get_weather", {"city": "Rome"})], finish="tool_calls", prompt_tokens=9, cached_tokens=0)
CACHE = Outcome(text="Hello world", finish="stop", prompt_tokens=PROMPT_TOKENS, cached_tokens=CACHED_TOKENS)
NO_URLS = "model 'm-gemini' cannot take images by URL"


def refused(message: str, status: int = 400) -> Outcome:
    return Outcome(status=status, error=message)


def target(door: str, provider: str, feature: str) -> Expect:
    """What the cell should do."""
    if feature == "text":
        return Expect(TEXT, NOTHING)
    if feature == "image":
        return Expect(TEXT, frozenset({"image data"}))
    if feature == "image by URL":
        if provider == "gemini":  # Gemini fetches no image by URL: never sent, a 400 naming it
            return Expect(refused(NO_URLS), None, "Gemini takes images inline only")
        return Expect(TEXT, frozenset({"image url"}))
    if feature == "tools":
        if door == "api/chat":
            return Expect(TEXT, NOTHING, "the native body has no tools: the field is ignored, as any unknown field")
        return Expect(TOOL_CALL, frozenset({"tools", "tool call", "tool result"}))
    if feature == "reasoning":
        # the Anthropic door hands back a signature where the upstream made one (Anthropic's, Gemini's)
        signature = SIGNATURE if door == "messages" and provider != "openai" else None
        asked = NOTHING if door == "api/chat" else frozenset({"thinking"})  # the native body cannot ask
        return Expect(Outcome(text="Hello", reasoning=THOUGHT, signature=signature, finish="stop", prompt_tokens=9,
                              cached_tokens=0), asked)
    return Expect(CACHE, NOTHING)


# -- the cells that do something else today, and what ------------------------------------------

TODAY: dict[tuple[str, str, str], Expect] = {}


def expect(door: str, provider: str, feature: str) -> Expect:
    return TODAY.get((door, provider, feature)) or target(door, provider, feature)


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("door", DOORS)
async def test_cell(upstreams, make_client, config_file, user, door, provider, feature):
    client = await make_client(GATEWAY_CONFIG=config_file(upstreams.toml()))
    # the native door sends no tools: an upstream that got none answers with text
    upstreams.script(provider, "text" if (door, feature) == ("api/chat", "tools") else feature)
    got = await DRIVERS[door](client, user.key, MODELS[provider], feature)
    expected = expect(door, provider, feature)
    assert got == expected.outcome
    received = upstreams.received(provider)
    if expected.arrived is None:
        assert received == []
    else:
        assert len(received) == 1 and arrived(provider, received[0]) == expected.arrived
        assert upstreams.problems(provider) == [[]]  # the provider's published request shape


# -- the documentation shows this matrix --------------------------------------------------------

PATHS = {"chat.completions": "POST /v1/chat/completions", "responses": "POST /v1/responses",
         "responses, store: false": "POST /v1/responses with \"store\": false",
         "messages": "POST /v1/messages", "api/chat": "POST /api/chat"}
KINDS = {"openai": "OpenAI-compatible", "anthropic": "Anthropic", "gemini": "Gemini"}


def cell_text(door: str, provider: str, feature: str, notes: list[str]) -> str:
    """✓ (at its target), the exact 400 a cell that cannot work answers, — (not a feature of the
    door) or ✗ (not at its target today), the last two with the number of their note."""
    now = TODAY.get((door, provider, feature))
    aim = target(door, provider, feature)
    if now is None and aim.outcome.status == 400:
        return f"400 “{aim.outcome.error}”"
    if now is None and not aim.note:
        return "✓"
    note = (now or aim).note
    if note not in notes:
        notes.append(note)
    return f"{'—' if now is None else '✗'} ({notes.index(note) + 1})"


def matrix() -> str:
    notes: list[str] = []
    lines = []
    for door in DOORS:
        lines += [f"### {PATHS[door]}", "", "| | " + " | ".join(KINDS[p] for p in PROVIDERS) + " |",
                  "|---|" + "---|" * len(PROVIDERS)]
        lines += [f"| {feature} | " + " | ".join(cell_text(door, p, feature, notes) for p in PROVIDERS) + " |"
                  for feature in FEATURES]
        lines.append("")
    lines += [f"({n}) {note}" + ("  " if n < len(notes) else "") for n, note in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def test_the_docs_show_the_matrix_as_it_is():
    text = DOCS.read_text()
    begin, end = "<!-- matrix: begin -->\n", "<!-- matrix: end -->"
    assert text[text.index(begin) + len(begin):text.index(end)] == matrix()


def test_every_cell_today_names_why_it_is_not_at_its_target():
    for cell, now in TODAY.items():
        assert now.note and now != target(*cell), cell

