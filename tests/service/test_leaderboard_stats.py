"""Honest leaderboard statistics: a weak prior, so few votes claim little;
intervals that cover the truth at their stated rate; a length-controlled rating beside the raw one."""

from __future__ import annotations

import math
import random
import uuid
from typing import Any

import asyncpg

from gateway.providers.demo import demo_reply
from gateway.service.leaderboard import POINTS, PROVISIONAL_BELOW, Battle, entry_json, leaderboard
from gateway.store.leaderboard import battles as stored_battles
from tests.support.arena import accept_arena, unique, vote, wait_comparison_finished
from tests.support.common import MakeClient, User, wait_for


def simulate(strengths: dict[str, float], count: int, rng: random.Random,
             lengths: dict[str, int] | None = None, length_coef: float = 0.0) -> list[Battle]:
    """Battles between random pairs, won with the Bradley-Terry probability of the true log-strengths
    (plus `length_coef` times the normalised length difference of the two replies, whose lengths
    scatter around each model's typical length)."""
    models = sorted(strengths)
    out: list[Battle] = []
    for _ in range(count):
        a, b = rng.sample(models, 2)
        la = int((lengths or {}).get(a, 100) * rng.uniform(0.3, 1.7))
        lb = int((lengths or {}).get(b, 100) * rng.uniform(0.3, 1.7))
        z = strengths[a] - strengths[b] + length_coef * (la - lb) / (la + lb)
        out.append((a, b, "a" if rng.random() < 1 / (1 + math.exp(-z)) else "b", la, lb))
    return out


def true_ratings(strengths: dict[str, float]) -> dict[str, float]:
    mean = sum(strengths.values()) / len(strengths)
    return {m: 1000 + POINTS * (s - mean) for m, s in strengths.items()}


def test_one_vote_gives_a_modest_gap_and_a_wide_interval() -> None:
    winner, loser = leaderboard([("x", "y", "a")])
    assert (winner.model, loser.model) == ("x", "y")
    # the unregularised fit would put them infinitely apart (1600 vs 400 with the old pseudo-win)
    assert (winner.rating, loser.rating) == (1058.6, 941.4)  # 117 apart; the average model sits at 1000
    for e in (winner, loser):
        assert e.battles == 1 and e.provisional is True
        assert e.ci_high - e.ci_low > 350  # +-200: one vote says little
        assert e.ci_low < 1000 < e.ci_high  # neither is shown to differ from the average
    assert loser.ci_high > winner.rating and winner.ci_low < loser.rating  # the intervals overlap widely


def test_provisional_until_the_minimum_battle_count() -> None:
    battles: list[Battle] = [("p", "q", "a"), ("q", "p", "tie")] * (PROVISIONAL_BELOW // 2)
    battles += [("p", "r", "b")]
    entries = {e.model: e for e in leaderboard(battles, rounds=20)}
    assert {m: (e.battles, e.provisional) for m, e in entries.items()} == {
        "p": (PROVISIONAL_BELOW + 1, False), "q": (PROVISIONAL_BELOW, False), "r": (1, True)}


def test_known_strengths_are_recovered_in_order_with_intervals_covering_the_truth() -> None:
    strengths = {"s1": 0.9, "s2": 0.45, "s3": 0.0, "s4": -0.35, "s5": -1.0}
    truth = true_ratings(strengths)
    covered = lc_covered = total = 0
    widths: list[float] = []
    for seed in range(12):
        battles = simulate(strengths, 600, random.Random(seed))
        entries = leaderboard(battles, rounds=60, seed=seed)
        assert [e.model for e in entries] == ["s1", "s2", "s3", "s4", "s5"], seed
        for e in entries:
            total += 1
            covered += e.ci_low <= truth[e.model] <= e.ci_high
            lc_covered += e.lc_ci_low <= truth[e.model] <= e.lc_ci_high
            widths.append(e.ci_high - e.ci_low)
            assert abs(e.rating - truth[e.model]) < 80, (seed, e, truth[e.model])
    # stated 95%: over 60 intervals, at least 54 (a binomial(60, 0.95) falls below that 5% of the time)
    assert covered >= 54 and lc_covered >= 54, (covered, lc_covered, total)
    # and not by being uselessly wide: 240 battles a model pin a rating to about +-40 points
    assert sum(widths) / len(widths) < 110, widths


def test_a_weaker_model_that_writes_longer_wins_the_raw_rating_not_the_length_controlled_one() -> None:
    # "verbose" is truly weaker than "concise" but writes three times as much, and voters like length
    strengths = {"concise": 0.3, "verbose": 0.0, "plain": 0.0, "terse": -0.3}
    lengths = {"concise": 300, "verbose": 900, "plain": 300, "terse": 300}
    battles = simulate(strengths, 3000, random.Random(7), lengths, length_coef=2.5)
    entries = {e.model: e for e in leaderboard(battles, rounds=30)}
    assert entries["verbose"].rating > entries["concise"].rating + 40  # raw: length wins
    assert entries["verbose"].rating_lc < entries["concise"].rating_lc - 40  # controlled: it does not
    truth = true_ratings(strengths)
    for model, e in entries.items():
        assert e.lc_ci_low <= truth[model] <= e.lc_ci_high, (e, truth[model])
    # without a length effect the two ratings agree
    fair = {e.model: e for e in leaderboard(simulate(strengths, 3000, random.Random(7), lengths), rounds=0)}
    for e in fair.values():
        assert abs(e.rating - e.rating_lc) < 15, e


LENGTHS_TOML = """
[providers.short]
kind = "demo"
chunks = 2

[providers.long]
kind = "demo"
chunks = 9

[models.{short}]
provider = "short"

[models.{long}]
provider = "long"
"""


async def test_api_leaderboard_shows_battles_provisional_pairs_and_the_length_controlled_rating(
        make_client: MakeClient, config_file: Any, user: User, db: asyncpg.Pool) -> None:
    short, long = unique("lc_short"), unique("lc_long")
    client = await make_client(GATEWAY_CONFIG=config_file(LENGTHS_TOML.format(short=short, long=long)),
                               LEADERBOARD_BOOTSTRAP_ROUNDS="20")
    prompts = []
    for i, (models, winner) in enumerate((([long, short], "a"), ([short, long], "b"), ([long, short], "b"))):
        prompt = f"length battle {i} {uuid.uuid4().hex[:6]}"
        prompts.append((prompt, models))
        answer = await accept_arena(client, user, content=prompt, models=models)
        await wait_comparison_finished(db, answer["comparison_id"])
        assert (await vote(client, user, answer["comparison_id"], winner)).status == 200

    # the battles carry the lengths of the two stored replies
    mine = [b for b in await stored_battles(db, False) if {b[0], b[1]} == {short, long}]
    expected = []
    for (prompt, (a, b)), winner in zip(prompts, ("a", "b", "b"), strict=True):
        la, lb = (len("".join(demo_reply(prompt, 9 if m == long else 2, m))) for m in (a, b))
        expected.append((a, b, winner, la, lb))
    assert mine == expected

    body: dict[str, Any] = {}

    async def refitted() -> bool:
        resp = await client.get("/api/leaderboard", headers=user.headers)
        assert resp.status == 200
        body.clear()
        body.update(await resp.json())
        return any(p["a"] == min(short, long) and p["b"] == max(short, long) and p["battles"] == 3
                   for p in body["pairs"])

    await wait_for(refitted)
    everything = await stored_battles(db, False)
    assert body["battles"] == len(everything) and body["provisional_below"] == PROVISIONAL_BELOW
    pair = next(p for p in body["pairs"] if {p["a"], p["b"]} == {short, long})
    assert pair == {"a": min(short, long), "b": max(short, long), "battles": 3,
                    "a_wins": 2.0 if min(short, long) == long else 1.0}
    # exactly the fit of the stored battles (the same seed gives the same intervals)
    fitted = {e.model: entry_json(e) for e in leaderboard(everything, rounds=20)}
    shown = {e["model"]: e for e in body["models"] if e["model"] in (short, long)}
    assert shown == {short: fitted[short], long: fitted[long]}
    assert shown[long]["provisional"] is True and shown[long]["battles"] == 3
    assert set(shown[long]) == {"model", "rating", "ci_low", "ci_high", "battles", "wins", "win_rate",
                                "provisional", "rating_lc", "lc_ci_low", "lc_ci_high"}
