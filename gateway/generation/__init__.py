"""Execute: a reply as a task the app owns, and everything that keeps it whole.

    task.py         the generation task and this process's registry of replies
    events.py       a reply's structured events and the log that holds them
    replay.py       a finished reply's events, rebuilt from its row
    checkpoints.py  a live reply's partial content, saved every few seconds
    durability.py   the finish write, durable whatever the database does
    journal.py      where a finished reply waits while the database is away
"""

__all__ = [
    "checkpoints",
    "durability",
    "events",
    "journal",
    "replay",
    "task",
]
