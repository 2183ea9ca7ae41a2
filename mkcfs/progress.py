"""A compact progress line for long directory builds.

When standard error is a terminal, ``Progress`` shows one line (entries walked, files and bytes
hashed) that a background thread redraws at most ten times a second, and erases when closed.
When it is not a terminal, ``Progress.for_stream`` returns ``None`` and callers do nothing.

Counters are plain attributes written by the walker (``entries``) and, under a lock, by the digest
pool as batches of files complete (``add_files``); the display thread only reads them.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TextIO

__all__ = ["Progress"]

_CLEAR = "\r\x1b[K"


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover - unreachable


class Progress:
    """One self-erasing status line on ``stream`` (a terminal)."""

    def __init__(self, stream: TextIO, interval: float = 0.1) -> None:
        self.stream = stream
        self.interval = interval
        #: entries (files, directories, ...) walked so far; written by the walker only.
        self.entries = 0
        self.files = 0
        self.bytes = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._shown = False
        self._start = time.monotonic()

    @classmethod
    def for_stream(cls, stream: TextIO | None = None, enabled: bool | None = None
                   ) -> Progress | None:
        """A started ``Progress`` on ``stream`` (default ``sys.stderr``), or ``None`` when
        ``enabled`` is false, or when it is ``None`` and the stream is not a terminal."""
        stream = sys.stderr if stream is None else stream
        if enabled is None:
            try:
                enabled = stream is not None and os.isatty(stream.fileno())
            except (AttributeError, OSError, ValueError):
                enabled = False
        if not enabled:
            return None
        progress = cls(stream)
        progress.start()
        return progress

    def add_files(self, files: int, nbytes: int) -> None:
        """Count ``files`` more files of ``nbytes`` bytes in all read and hashed (thread safe)."""
        with self._lock:
            self.files += files
            self.bytes += nbytes

    def line(self) -> str:
        elapsed = time.monotonic() - self._start
        return (f"mkcomposefs: {self.entries} entries, {self.files} files hashed "
                f"({_human(self.bytes)}), {elapsed:.1f} s")

    def _draw(self) -> None:
        text = self.line()
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            width = 80
        if width > 1:
            text = text[: width - 1]   # never wrap: "\r" only returns within one screen line
        try:
            self.stream.write(_CLEAR + text)
            self.stream.flush()
            self._shown = True
        except (OSError, ValueError):
            pass

    def _run(self) -> None:
        # first draw after one interval: short builds never show a line at all
        while not self._stop.wait(self.interval):
            self._draw()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mkcfs-progress", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop redrawing and erase the line (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._shown:
            try:
                self.stream.write(_CLEAR)
                self.stream.flush()
            except (OSError, ValueError):
                pass
            self._shown = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
