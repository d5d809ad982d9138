"""Decide: the operator's rules, exact across instances.

    admission.py  one decision per request (approve, downgrade, refuse) against every cap
    quota.py      quota slices: a busy caller admitted from memory, the caps still exact
"""

__all__ = [
    "admission",
    "quota",
]
