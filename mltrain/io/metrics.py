"""Per-run metrics as JSON Lines, written by rank 0 only. Not collective."""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["MetricsWriter"]


class MetricsWriter:
    """Appends one JSON object per record to ``path`` (line-buffered, so a crash loses at
    most the line being written). A no-op on ranks other than 0. ``keep`` also holds the
    records in ``records`` (rank 0; a search trial's learning curve)."""

    def __init__(self, path: str | Path | None, rank: int, *, keep: bool = False):
        self.path = Path(path) if path is not None else None
        self.records: list[dict] | None = [] if keep and rank == 0 else None
        self._fh = None
        if rank == 0 and self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", buffering=1)

    def write(self, **record) -> None:
        if self.records is not None:
            self.records.append(record)
        if self._fh is not None:
            self._fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
