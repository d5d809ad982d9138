"""The database: the pool, the migrations, batched writers, and SQL by table family.

    db.py           the pool, the embedded server, the migration runner
    background.py   batched writes off the request path, and group commit
    failures.py     transient or permanent: what a failed write means
    chats.py        app chat ids (the AI SDK door's `id`): one thread of their user each
    messages.py, threads.py, arena.py, keys.py, limits.py, usage.py, activity.py,
    instances.py, leaderboard.py, models.py, secrets.py   SQL by table family
    erasure.py      every row that names a user, deleted in one transaction
    retention.py    threads untouched too long, deleted in batches by a background task

Every statement that reads or writes a user's rows checks that user in the same statement.
"""

__all__ = [
    "activity",
    "arena",
    "background",
    "chats",
    "db",
    "erasure",
    "failures",
    "instances",
    "keys",
    "leaderboard",
    "limits",
    "messages",
    "models",
    "retention",
    "secrets",
    "threads",
    "usage",
]
