"""Wording shared by the collector's command-line output."""
from __future__ import annotations


def plural(count: int, noun: str) -> str:
    """'1 run', '3 runs' (nouns that take an s)."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
