"""The tracker's history in SQLite: every event it emits (:mod:`tether.tracker.events`), the sessions,
servers and health states folded from them, and usage over a time window. Standard library only.

``Journal(path)`` writes (a thread of its own; :meth:`Journal.attach` to a tracker's ``core.events``) and
reads; ``JournalReader(path)`` only reads (``tether usage``, a web side in another process). The CLI's
``--db`` flags: :mod:`tether.journal.cli`.
"""

from .reader import JournalReader
from .schema import SCHEMA_VERSION, JournalError
from .writer import Journal, JournalStats

__all__ = ["SCHEMA_VERSION", "Journal", "JournalError", "JournalReader", "JournalStats"]
