"""Arena ratings: a Bradley-Terry model fitted to the votes, on the familiar Elo-like scale.

Each model i has a strength p_i; P(i beats j) = p_i / (p_i + p_j). The maximum-likelihood
strengths come from the classic minorisation-maximisation iteration (Hunter 2004):
p_i <- W_i / sum_j n_ij / (p_i + p_j), where W_i counts i's wins (a tie, or "both bad", is
half a win each) and n_ij the battles between i and j. Ratings are 1000 + 400 log10(p_i)
with the strengths' geometric mean fixed at 1, so the average model sits at 1000 and 400
points mean 10:1 odds. 95% intervals come from refitting on bootstrap resamples of the
battles.

The fit is CPU work, so the cache runs it off the event loop, in a thread, and only when
votes arrived (or its age passed the TTL, for votes on other instances).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

Battle = tuple[str, str, str]  # (model a, model b, winner: a | b | tie | both_bad)

SCALE, BASE, INIT = 400.0, 10.0, 1000.0
# a model with no win at all would have strength 0 (rating -infinity): a tiny pseudo-win keeps
# it finite without moving the others noticeably
PSEUDO_WIN = 1e-3


def _score(winner: str) -> float:
    return {"a": 1.0, "b": 0.0}.get(winner, 0.5)


def fit(battles: Sequence[Battle], iterations: int = 1000, tol: float = 1e-10) -> dict[str, float]:
    """Ratings by model from the battles (models that never played are absent)."""
    models = sorted({m for a, b, _ in battles for m in (a, b)})
    if not models:
        return {}
    index = {m: i for i, m in enumerate(models)}
    n = len(models)
    wins = [PSEUDO_WIN] * n
    games: Counter[tuple[int, int]] = Counter()
    for a, b, winner in battles:
        i, j = index[a], index[b]
        s = _score(winner)
        wins[i] += s
        wins[j] += 1.0 - s
        games[(min(i, j), max(i, j))] += 1
    pairs = [(i, j, c) for (i, j), c in games.items()]
    p = [1.0] * n
    for _ in range(iterations):
        denom = [0.0] * n
        for i, j, c in pairs:
            d = c / (p[i] + p[j])
            denom[i] += d
            denom[j] += d
        new = [wins[i] / denom[i] if denom[i] else p[i] for i in range(n)]
        log_mean = sum(math.log(x) for x in new) / n
        new = [x / math.exp(log_mean) for x in new]
        change = max(abs(x - y) / y for x, y in zip(new, p, strict=True))
        p = new
        if change < tol:
            break
    return {m: INIT + SCALE * math.log(p[index[m]], BASE) for m in models}


@dataclass(frozen=True, slots=True)
class Entry:
    model: str
    rating: float
    ci_low: float
    ci_high: float
    battles: int
    wins: float  # ties count half
    win_rate: float


def leaderboard(battles: Sequence[Battle], rounds: int = 200, seed: int = 0) -> list[Entry]:
    """Ratings with bootstrap 95% intervals, battle counts and win rates, best first."""
    ratings = fit(battles)
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {m: [] for m in ratings}
    for _ in range(rounds if battles else 0):
        refit = fit(rng.choices(battles, k=len(battles)))
        for model, rating in refit.items():
            samples[model].append(rating)
    played: Counter[str] = Counter()
    won: defaultdict[str, float] = defaultdict(float)  # ties count half
    for a, b, winner in battles:
        played[a] += 1
        played[b] += 1
        won[a] += _score(winner)
        won[b] += 1.0 - _score(winner)
    entries = []
    for model, rating in ratings.items():
        s = sorted(samples[model]) or [rating]
        low, high = s[int(0.025 * (len(s) - 1))], s[math.ceil(0.975 * (len(s) - 1))]
        entries.append(Entry(model, round(rating, 1), round(low, 1), round(high, 1), played[model], won[model],
                             round(won[model] / played[model], 4)))
    return sorted(entries, key=lambda e: -e.rating)


class LeaderboardCache:
    """Computed off the request path: a vote schedules a refit in the background, and readers get
    the last result meanwhile (a result older than ttl_s, say for votes cast on other instances,
    is refreshed the same way). Only the very first read waits for a fit."""

    def __init__(self, load: Callable[[bool], Awaitable[list[Battle]]], ttl_s: float = 60.0,
                 rounds: int = 200) -> None:
        self._load = load
        self._ttl = ttl_s
        self._rounds = rounds
        self._cached: dict[bool, tuple[float, dict[str, object]]] = {}
        self._refreshing: dict[bool, asyncio.Task[dict[str, object]]] = {}

    def votes_changed(self) -> None:
        for include_named in list(self._cached) or [False]:
            self._refresh(include_named, restart=True)

    async def get(self, include_named: bool = False) -> dict[str, object]:
        hit = self._cached.get(include_named)
        if hit is None:
            return await asyncio.shield(self._refresh(include_named))
        if time.monotonic() - hit[0] >= self._ttl:
            self._refresh(include_named)
        return hit[1]

    async def close(self) -> None:
        for task in list(self._refreshing.values()):
            task.cancel()
        await asyncio.gather(*self._refreshing.values(), return_exceptions=True)

    def _refresh(self, include_named: bool, restart: bool = False) -> asyncio.Task[dict[str, object]]:
        running = self._refreshing.get(include_named)
        if running is not None and not running.done():
            if not restart:
                return running
            # a vote arrived during a fit that may not include it: fit again once it is done
            running.add_done_callback(lambda _: self._refresh(include_named))
            return running
        task = asyncio.get_running_loop().create_task(self._fit(include_named))
        self._refreshing[include_named] = task
        return task

    async def _fit(self, include_named: bool) -> dict[str, object]:
        battles = await self._load(include_named)
        started = time.perf_counter()
        entries = await asyncio.to_thread(leaderboard, battles, self._rounds)
        result: dict[str, object] = {"models": [entry_json(e) for e in entries], "battles": len(battles),
                                     "anonymous_only": not include_named,
                                     "fit_ms": round((time.perf_counter() - started) * 1000, 1)}
        self._cached[include_named] = (time.monotonic(), result)
        return result


def entry_json(e: Entry) -> dict[str, object]:
    return {"model": e.model, "rating": e.rating, "ci_low": e.ci_low, "ci_high": e.ci_high, "battles": e.battles,
            "wins": e.wins, "win_rate": e.win_rate}
