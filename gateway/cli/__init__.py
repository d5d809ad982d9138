"""The command line: `python -m gateway` and `chat-gateway`.

    commands.py  keys, usage and leaderboard, printed as tables
    workers.py   serve --workers N: N processes on one port, supervised
"""

__all__ = [
    "commands",
    "workers",
]
