"""Copying a store: every session and row of one store into another, ids kept.

Built only on ``Store``'s own copying steps (``dump_rows``, ``load_rows``, ``loaded``), so
it copies between any two backends, a DuckDB file and the team store either way.
"""

from __future__ import annotations

from .._exceptions import StoreError
from . import TABLES, Db, key_of, open_store

__all__ = ["copy_store"]


def copy_store(src: Db, dst: Db, *, batch: int = 5_000) -> dict[str, int]:
    """Copy every session and row of the store ``src`` into ``dst``, keeping their ids.

    For moving a local DuckDB file into a team store (or the other way, for a backup):
    ``copy_store("~/.nbchat/nbchat.duckdb", "postgresql://me@db/nbchat")``. Rows that
    ``dst`` has already (same id) are left as they are, so running it again adds nothing.
    Returns the rows added per table.
    """
    added: dict[str, int] = {}
    with open_store(src) as source, open_store(dst, create=True) as target:
        if source.path == target.path:
            raise StoreError(f"copy_store() needs two stores; both are {source.path}.")
        for table in TABLES:  # sessions first: a reader never sees rows without their session
            added[table] = 0
            after: str | None = None
            while True:
                columns, rows = source.dump_rows(table, after=after, limit=batch)
                if not rows:
                    break
                added[table] += target.load_rows(table, columns, rows)
                after = rows[-1][columns.index(key_of(table))]
        target.loaded()
    return added
