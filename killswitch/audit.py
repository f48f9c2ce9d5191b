"""The append-only audit log (state_dir/audit.jsonl), fsynced off the hot path."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

AUDIT_FILE_NAME = "audit.jsonl"


class AuditLog:
    """Queues records and appends them in a thread; a failing disk is reported."""

    def __init__(self, path: Path, on_error: Callable[[str, Exception], None]) -> None:
        self.path = path
        self._on_error = on_error
        self._pending: list[dict[str, Any]] = []
        self._wake = asyncio.Event()
        self._tg = asyncio.TaskGroup()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.last_error: str | None = None
        self.dropped = 0

    def append(self, event: str, **fields: Any) -> None:
        """Queue one record; never blocks and never raises, from any thread.

        Write-error callbacks run in worker threads (the state writer's), and an
        asyncio.Event must only be set on its own loop's thread.
        """
        record = {"time": time.time(), "event": event, **fields}
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._loop is None or running is self._loop:
            self._queue(record)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue, record)
        except RuntimeError:  # the loop is closed: nobody is left to write it
            self.dropped += 1

    def _queue(self, record: dict[str, Any]) -> None:
        self._pending.append(record)
        self._wake.set()

    async def __aenter__(self) -> AuditLog:
        self._loop = asyncio.get_running_loop()
        await self._tg.__aenter__()
        self._tg.create_task(self._run(), name="audit.writer")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopping = True
        self._wake.set()
        await self._tg.__aexit__(exc_type, exc, tb)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._pending:
                batch, self._pending = self._pending, []
                await asyncio.to_thread(self._write, batch)
            if self._stopping and not self._pending:
                return

    def _write(self, batch: list[dict[str, Any]]) -> None:
        lines = "".join(
            json.dumps(r, sort_keys=True, default=str) + "\n" for r in batch
        )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                data = memoryview(lines.encode())
                while data:  # a short write (disk nearly full) must not lose the rest
                    data = data[os.write(fd, data) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            self.last_error = None
        except OSError as exc:
            # Records that cannot be written are counted, not kept forever:
            # memory must stay bounded while the disk is broken.
            self.dropped += len(batch)
            self.last_error = f"audit: {exc.strerror or exc}"
            self._on_error("audit", exc)
