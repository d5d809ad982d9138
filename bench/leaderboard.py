#!/usr/bin/env python3
"""The arena leaderboard on synthetic votes: does the fit recover known strengths, and how long
does a refit (with its bootstrap intervals) take?

Draws --votes battles between models of known strength (P(a beats b) = s_a / (s_a + s_b), a
share of ties), fits them with gateway.service.leaderboard, and prints the table and the refit time.

    .venv/bin/python bench/leaderboard.py --votes 5000
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.service.leaderboard import Battle, leaderboard

STRENGTHS = {"strong-large": 4.0, "strong-small": 2.5, "mid": 1.5, "fast": 1.0, "tiny": 0.5}


def synthetic_votes(n: int, ties: float, rng: random.Random) -> list[Battle]:
    models = list(STRENGTHS)
    votes: list[Battle] = []
    for _ in range(n):
        a, b = rng.sample(models, 2)
        if rng.random() < ties:
            votes.append((a, b, "tie" if rng.random() < 0.7 else "both_bad"))
        else:
            votes.append((a, b, "a" if rng.random() < STRENGTHS[a] / (STRENGTHS[a] + STRENGTHS[b]) else "b"))
    return votes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--votes", type=int, default=5000)
    p.add_argument("--ties", type=float, default=0.1, help="share of tie / both_bad votes")
    p.add_argument("--rounds", type=int, default=200, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    votes = synthetic_votes(a.votes, a.ties, random.Random(a.seed))
    started = time.perf_counter()
    entries = leaderboard(votes, rounds=a.rounds)
    seconds = time.perf_counter() - started
    # the true ratings on the same scale: geometric mean of strengths at 1000
    mean_log = sum(math.log10(s) for s in STRENGTHS.values()) / len(STRENGTHS)
    print(f"{a.votes} votes, {a.rounds} bootstrap rounds: refit in {seconds * 1000:.0f} ms\n")
    print("| # | model | rating | 95% CI | battles | win rate | true rating |")
    print("|---|---|---|---|---|---|---|")
    for i, e in enumerate(entries, 1):
        true = 1000 + 400 * (math.log10(STRENGTHS[e.model]) - mean_log)
        print(f"| {i} | {e.model} | {e.rating:.1f} | {e.ci_low:.1f} – {e.ci_high:.1f} | {e.battles} | "
              f"{e.win_rate:.3f} | {true:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
