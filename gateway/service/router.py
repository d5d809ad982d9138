"""Decide, part one: which model runs. The router only advises; the policy may override it.

For `"model": "auto"` it classifies the prompt by cheap rules (no model call, no database)
and looks the category up in the `[router]` table, falling back to the default model. For
`"model": "random"` it takes the model the registry draws by weight (skipping open circuits),
among the models the caller may use (turns.py hands it a draw narrowed to its key's `models`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

AUTO = "auto"
RANDOM = "random"

_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("code", re.compile(r"```|\b(def|class|function|import|return|SELECT|traceback|exception|stack trace|"
                        r"compile|python|javascript|typescript|rust|golang|sql|regex|bug|refactor)\b", re.I)),
    ("math", re.compile(r"\b(solve|equation|integral|derivative|prove|theorem|probability|matrix)\b|"
                        r"\d+\s*[-+*/^=]\s*\d+", re.I)),
    ("creative", re.compile(r"\b(poem|story|haiku|lyrics|song|novel|fiction|write me a|limerick)\b", re.I)),
)


@dataclass(frozen=True, slots=True)
class Route:
    model: str
    category: str | None
    complexity: str | None
    auto: bool
    selected: str | None = None  # how the model was chosen when the client let us: "random"


def classify(prompt: str) -> tuple[str, str]:
    """(category, complexity) of a prompt; complexity is low / medium / high by size and structure."""
    category = next((name for name, rule in _RULES if rule.search(prompt)), "general")
    words = len(prompt.split())
    complexity = "high" if words > 300 or prompt.count("\n") > 30 else "medium" if words > 40 else "low"
    return category, complexity


def route(requested: str | None, prompt: str, table: dict[str, str], default: str,
          draw: Callable[[], str] | None = None) -> Route:
    """`draw`: a model drawn at random among those the caller may use (the registry's `draw_name`),
    for `"model": "random"`."""
    if requested == RANDOM and draw is not None:
        drawn = draw()
        return Route(drawn, None, None, auto=False, selected=RANDOM if drawn != RANDOM else None)
    if requested and requested != AUTO:
        return Route(requested, None, None, auto=False)
    category, complexity = classify(prompt)
    return Route(table.get(category, table.get("default", default)), category, complexity, auto=True)
