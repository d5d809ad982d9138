"""The service layer: a turn from validated input to a running reply, for every front door.

    turns.py        persist, decide, start, find, cancel a reply
    router.py       which model runs (the router advises; the policy decides)
    leaderboard.py  arena ratings fitted to the votes
    erasure.py      erasing a user: keys revoked, live replies cancelled, every row and stream deleted
    reload.py       the configuration file read again while serving (SIGHUP, POST /api/admin/reload)
"""

__all__ = [
    "erasure",
    "leaderboard",
    "reload",
    "router",
    "turns",
]
