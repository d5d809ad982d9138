"""The usage event's data: the prompt's cached parts appear only when there are any, live and replayed alike."""

from __future__ import annotations

import uuid
from typing import Any

from gateway.generation.events import EventLog, EventMaker, reasoning_json, usage_json
from gateway.generation.replay import replay_events

MESSAGE = uuid.UUID("4d460000-0000-4000-8000-000000000001")


def stored(metadata: dict[str, Any]) -> dict[str, Any]:
    return {"id": MESSAGE, "slot": None, "thread_id": uuid.UUID(int=1), "reply_to": uuid.UUID(int=2),
            "model": "m", "provider": "p", "content": "Hello", "error": None, "prompt_tokens": 170,
            "completion_tokens": 2, "metadata": {"finish_reason": "stop", "chunks": [5], **metadata}}


def test_a_usage_without_cache_is_the_same_bytes_as_ever():
    event = EventMaker(MESSAGE).event(2, "usage", usage_json(9, 2, False))
    assert event.sse == (b"id: 4d460000-0000-4000-8000-000000000001:2\nevent: usage\n"
                         b'data: {"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}\n\n')


def test_the_cached_parts_follow_the_totals_live_and_replayed():
    live = EventMaker(MESSAGE).event(2, "usage", usage_json(170, 2, False, 150, 10))
    assert live.data == (b'{"prompt_tokens":170,"completion_tokens":2,"total_tokens":172,"cached_tokens":150,'
                         b'"cache_write_tokens":10}')
    replayed = replay_events(stored({"cached_tokens": 150, "cache_write_tokens": 10}))
    assert [e.name for e in replayed] == ["metadata", "delta", "usage", "done"]
    assert replayed[2].sse == live.sse
    only_read = replay_events(stored({"cached_tokens": 150}))[2]
    assert only_read.data == b'{"prompt_tokens":170,"completion_tokens":2,"total_tokens":172,"cached_tokens":150}'


def test_a_log_re_makes_old_deltas_around_the_reasoning_events_it_keeps():
    maker, parts = EventMaker(MESSAGE), []
    log = EventLog(maker, parts)
    made = [maker.event(0, "metadata", {"model": "m"})]
    log.append(made[0])
    for i in range(300):  # far more than the recent window holds
        if i in (0, 1, 150):
            event = maker.event(log.count, "reasoning", reasoning_json(f"thought {i}", "sig" if i == 1 else None))
            log.append_side(event)
        else:
            parts.append(f"chunk {i} ")
            event = maker.delta(log.count, parts[-1])
            log.append(event)
        made.append(event)
    assert [e.sse for e in log.between(0, log.count)] == [e.sse for e in made]
    assert made[2].data == b'{"delta":"thought 1","signature":"sig"}'
