"""Arena ratings: a Bradley-Terry model fitted to the votes, on the familiar Elo-like scale.

Each model i has a log-strength t_i; P(i beats j) = 1 / (1 + exp(t_j - t_i)). Ratings are
1000 + 400 log10(e^t_i), so 400 points mean 10:1 odds and the average model sits at 1000.

Honest with few votes: the fit is a maximum a posteriori one, with a weak Gaussian prior on every
t_i (an L2 penalty, PRIOR): one vote puts two models 117 points apart, each with a 95% interval
of +-200 (the maximum-likelihood fit would put them infinitely far apart, with no doubt at all),
while a model's hundreds of battles are barely moved by it. The 95% interval
of a rating is the wider of two: the bootstrap's (refits on resampled battles: the spread the votes
themselves show) and the posterior's (+-1.96 standard deviations from the inverse Hessian, of the
rating against the average model: what the bootstrap cannot see when there are few battles, e.g.
one vote resampled is always the same vote).
Models with fewer than PROVISIONAL_BELOW battles are marked provisional.

Length control (LMArena's "style control", restricted to length): a second fit (its interval the
posterior's only: it is too costly to bootstrap) adds one covariate,
the normalised length difference of the two replies (len_a - len_b) / (len_a + len_b), with its own
coefficient (under the same weak prior). Voters who prefer longer replies raise that coefficient
instead of the ratings of the models that write more, so a model that wins by length alone falls
back in `rating_lc`.

Both fits are Newton's method on the penalised log-likelihood (convex: a few steps, each a small
linear solve), over battles aggregated by pair, outcome and (binned) length difference. The
unregularised maximum-likelihood fit (`fit`, Hunter's MM iteration) is kept for reference.

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

# (model a, model b, winner: a | b | tie | both_bad), optionally followed by the lengths of the two
# replies (characters) for the length-controlled rating
Battle = tuple[str, str, str] | tuple[str, str, str, int, int]

SCALE, BASE, INIT = 400.0, 10.0, 1000.0
# a model with no win at all would have strength 0 (rating -infinity): a tiny pseudo-win keeps
# it finite without moving the others noticeably
PSEUDO_WIN = 1e-3
# the prior: each log-strength ~ N(0, 1/PRIOR), a standard deviation of 174 rating points. Weak: a
# model's 20 battles weigh about 5 against its 1.
PRIOR = 1.0
# the same weak prior on the length coefficient (log-odds per unit of normalised length difference):
# without it, a few battles whose replies differ by a few characters would fit any coefficient at all
LENGTH_PRIOR = 1.0
PROVISIONAL_BELOW = 20  # battles
Z95 = 1.959964
POINTS = SCALE / math.log(BASE)  # rating points per unit of log-strength
LENGTH_BIN = 0.01  # length differences are binned this finely before aggregating


def _score(winner: str) -> float:
    return {"a": 1.0, "b": 0.0}.get(winner, 0.5)


def fit(battles: Sequence[Battle], iterations: int = 1000, tol: float = 1e-10) -> dict[str, float]:
    """The unregularised maximum-likelihood ratings by model (models that never played are absent):
    certain of a single vote, so the leaderboard shows fit_penalised's instead."""
    models = sorted({m for battle in battles for m in battle[:2]})
    if not models:
        return {}
    index = {m: i for i, m in enumerate(models)}
    n = len(models)
    wins = [PSEUDO_WIN] * n
    games: Counter[tuple[int, int]] = Counter()
    for battle in battles:
        i, j = index[battle[0]], index[battle[1]]
        s = _score(battle[2])
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
class Fit:
    """A penalised fit: log-strengths, their posterior standard deviations, the length coefficient."""
    strength: dict[str, float]
    sd: dict[str, float]
    length_coef: float  # log-odds per unit of normalised length difference (0 without length control)

    def rating(self, model: str) -> float:
        return INIT + POINTS * self.strength[model]


def _lengths(battle: Battle) -> float:
    """The normalised length difference of a battle's replies, in [-1, 1] (0 when unknown)."""
    if len(battle) != 5:
        return 0.0
    la, lb = battle[3], battle[4]
    return round((la - lb) / (la + lb) / LENGTH_BIN) * LENGTH_BIN if la + lb > 0 else 0.0


def _solve(h: list[list[float]], g: list[float]) -> list[float]:
    """x with h x = g, by Gaussian elimination with partial pivoting (h is small and positive definite)."""
    n = len(g)
    m = [[*row, g[i]] for i, row in enumerate(h)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            if f:
                for c in range(col, n + 1):
                    m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def fit_penalised(battles: Sequence[Battle], prior: float = PRIOR, length: bool = False,
                  iterations: int = 50) -> Fit:
    """The maximum a posteriori Bradley-Terry fit (Gaussian prior of precision `prior` on each
    log-strength), with the normalised length difference as a covariate when `length`."""
    models = sorted({m for battle in battles for m in battle[:2]})
    if not models:
        return Fit({}, {}, 0.0)
    index = {m: i for i, m in enumerate(models)}
    n = len(models)
    d = n + 1 if length else n
    rows: Counter[tuple[int, int, float, float]] = Counter()  # (i, j, length difference, score) -> count
    for battle in battles:
        rows[(index[battle[0]], index[battle[1]], _lengths(battle) if length else 0.0, _score(battle[2]))] += 1
    theta = [0.0] * d

    def loss(t: list[float]) -> float:
        total = 0.5 * prior * sum(x * x for x in t[:n]) + (0.5 * LENGTH_PRIOR * t[n] ** 2 if length else 0.0)
        for (i, j, x, s), w in rows.items():
            z = t[i] - t[j] + (t[n] * x if length else 0.0)
            # log(1 + e^z) - s z, computed without overflow
            total += w * ((z if z > 0 else 0.0) + math.log1p(math.exp(-abs(z))) - s * z)
        return total

    def derivatives(t: list[float]) -> tuple[list[float], list[list[float]]]:
        g = [prior * x for x in t[:n]] + ([0.0] if length else [])
        h = [[0.0] * d for _ in range(d)]
        for k in range(n):
            h[k][k] = prior
        if length:
            g[n] = LENGTH_PRIOR * t[n]
            h[n][n] = LENGTH_PRIOR
        for (i, j, x, s), w in rows.items():
            p = _sigmoid(t[i] - t[j] + (t[n] * x if length else 0.0))
            r, c = w * (p - s), w * p * (1.0 - p)
            g[i] += r
            g[j] -= r
            h[i][i] += c
            h[j][j] += c
            h[i][j] -= c
            h[j][i] -= c
            if length:
                g[n] += r * x
                h[i][n] += c * x
                h[n][i] += c * x
                h[j][n] -= c * x
                h[n][j] -= c * x
                h[n][n] += c * x * x
        return g, h

    current = loss(theta)
    for _ in range(iterations):
        g, h = derivatives(theta)
        step = _solve(h, g)
        scale = 1.0
        while True:  # Newton with backtracking: the penalised loss is convex, so a short step helps
            trial = [t - scale * s for t, s in zip(theta, step, strict=True)]
            trial_loss = loss(trial)
            if trial_loss <= current or scale < 1e-6:
                break
            scale /= 2
        theta, current = trial, trial_loss
        if max(abs(s) for s in step) * scale < 1e-9:
            break
    # the posterior covariance is the inverse Hessian; a rating is read against the average model
    # (the scale's anchor), so its spread is that of t_i - mean(t): the covariance, centred
    _, h = derivatives(theta)
    columns = [_solve(h, [1.0 if r == k else 0.0 for r in range(d)])[:n] for k in range(n)]
    row_mean = [sum(col[r] for col in columns) / n for r in range(n)]
    grand = sum(row_mean) / n
    sd = {m: math.sqrt(max(columns[k][k] - 2 * row_mean[k] + grand, 0.0)) for m, k in index.items()}
    return Fit({m: theta[k] for m, k in index.items()}, sd, theta[n] if length else 0.0)


@dataclass(frozen=True, slots=True)
class Entry:
    model: str
    rating: float
    ci_low: float
    ci_high: float
    battles: int
    wins: float  # ties count half
    win_rate: float
    provisional: bool = False  # fewer than PROVISIONAL_BELOW battles
    rating_lc: float = 0.0  # length-controlled
    lc_ci_low: float = 0.0
    lc_ci_high: float = 0.0


def _interval(point: Fit, model: str, samples: list[float]) -> tuple[float, float]:
    """The wider of the bootstrap percentile interval and the posterior's +-1.96 sd."""
    rating, half = point.rating(model), Z95 * POINTS * point.sd[model]
    s = sorted(samples) or [rating]
    low, high = s[int(0.025 * (len(s) - 1))], s[math.ceil(0.975 * (len(s) - 1))]
    return round(min(low, rating - half), 1), round(max(high, rating + half), 1)


def leaderboard(battles: Sequence[Battle], rounds: int = 200, seed: int = 0) -> list[Entry]:
    """Ratings (raw and length-controlled) with 95% intervals, battle counts and win rates, best first."""
    raw, lc = fit_penalised(battles), fit_penalised(battles, length=True)
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {m: [] for m in raw.strength}
    for _ in range(rounds if battles else 0):
        refit = fit_penalised(rng.choices(battles, k=len(battles)))
        for model in refit.strength:
            samples[model].append(refit.rating(model))
    played: Counter[str] = Counter()
    won: defaultdict[str, float] = defaultdict(float)  # ties count half
    for battle in battles:
        a, b, s = battle[0], battle[1], _score(battle[2])
        played[a] += 1
        played[b] += 1
        won[a] += s
        won[b] += 1.0 - s
    entries = []
    for model in raw.strength:
        low, high = _interval(raw, model, samples[model])
        # the length-controlled fit has a row per battle where the raw one has a few per pair, so it
        # is not bootstrapped (200 refits of 5,000 battles: 10 s of CPU): its interval is the posterior's
        lc_low, lc_high = _interval(lc, model, [])
        entries.append(Entry(model, round(raw.rating(model), 1), low, high, played[model], won[model],
                             round(won[model] / played[model], 4), played[model] < PROVISIONAL_BELOW,
                             round(lc.rating(model), 1), lc_low, lc_high))
    return sorted(entries, key=lambda e: -e.rating)


def length_effect(battles: Sequence[Battle]) -> float:
    """Rating points a reply gains against one half its length (normalised difference 1/3)."""
    return round(POINTS * fit_penalised(battles, length=True).length_coef / 3, 1)


def pairs(battles: Sequence[Battle]) -> list[dict[str, object]]:
    """Battles and wins (ties half) of each pair of models, the pair named in sorted order."""
    games: Counter[tuple[str, str]] = Counter()
    wins: defaultdict[tuple[str, str], float] = defaultdict(float)
    for battle in battles:
        a, b, s = battle[0], battle[1], _score(battle[2])
        if a > b:
            a, b, s = b, a, 1.0 - s
        games[(a, b)] += 1
        wins[(a, b)] += s
    return [{"a": a, "b": b, "battles": n, "a_wins": wins[(a, b)]} for (a, b), n in sorted(games.items())]


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
        entries, effect, met = await asyncio.to_thread(
            lambda: (leaderboard(battles, self._rounds), length_effect(battles), pairs(battles)))
        result: dict[str, object] = {"models": [entry_json(e) for e in entries], "battles": len(battles),
                                     "pairs": met, "length_effect": effect, "provisional_below": PROVISIONAL_BELOW,
                                     "anonymous_only": not include_named,
                                     "fit_ms": round((time.perf_counter() - started) * 1000, 1)}
        self._cached[include_named] = (time.monotonic(), result)
        return result


def entry_json(e: Entry) -> dict[str, object]:
    return {"model": e.model, "rating": e.rating, "ci_low": e.ci_low, "ci_high": e.ci_high, "battles": e.battles,
            "wins": e.wins, "win_rate": e.win_rate, "provisional": e.provisional, "rating_lc": e.rating_lc,
            "lc_ci_low": e.lc_ci_low, "lc_ci_high": e.lc_ci_high}
