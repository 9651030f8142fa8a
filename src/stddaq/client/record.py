"""Start a recording on a writer driver (std_det_driver) and follow it to its end.

Async use::

    async with DriverClient("ws://daq-host:8080") as driver:
        result = await driver.record("/data/run1", n_image=1000, on_status=print)
    result.ok, result.count, result.files

or the blocking ``record(url, path, n_image=...)``. The protocol is SPEC 8: the client sends
``start``/``stop`` as JSON text frames; the driver pushes ``{"status": ...}`` at 10 Hz and on every
change, and answers a bad command with ``error`` and a busy driver with ``rejected``. A recording
is over at ``file_saved`` (success) or ``error``; ``rejected`` means it never started.

Only ``websockets`` is needed (no HDF5): a laptop can drive a recording.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Statuses that end a recording, as far as the client is concerned.
FINAL = frozenset({"file_saved", "error", "rejected"})
#: Statuses that say a recording is under way (a stop then makes sense).
ACTIVE = frozenset({"creating_file", "waiting_for_first_image", "recording", "stop", "saving_file"})


#: Statuses a DriverClient keeps unread (the oldest go first): at 10 Hz, about 7 minutes' worth.
MAX_BACKLOG = 4096


class DriverError(Exception):
    """The driver could not be reached, or it closed the connection before the recording ended."""


@dataclass
class RecordResult:
    """How a recording ended: ``status`` file_saved (ok), error or rejected, with the driver's words;
    or cancelled (stopped before the start was sent: nothing recorded)."""

    status: str
    count: int = 0
    reason: str | None = None
    files: list[Path] = field(default_factory=list)
    statuses: list[dict[str, Any]] = field(default_factory=list)
    n_image: int | None = None  # what was asked (None: until stop)
    stop_sent: bool = False  # this client sent stop (its stop_event)

    @property
    def ok(self) -> bool:
        """The files were saved (maybe fewer images than asked: see ``complete``)."""
        return self.status == "file_saved"

    @property
    def complete(self) -> bool:
        """The files were saved with every image asked for. A run stopped early (by this client,
        or by another client of the driver) saved fewer: ``ok`` but not complete."""
        return self.ok and (self.n_image is None or self.count >= self.n_image)


#: a host name: letters (an internationalised name too: websockets encodes it), digits, '_' (not in
#: DNS, but in hosts files), '-', '.'; a trailing '.' (a fully qualified name) allowed
_HOST = re.compile(r"\w(?:[\w.-]*\w)?\.?")


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)  # an IPv6 zone (fe80::1%eth0) too
    except ValueError:
        return False
    return True


def check_driver_url(url: str) -> str:
    """``url`` if it is a driver's websocket address (``ws://host:port``, or ``wss://``, with a
    path behind a proxy); ValueError saying what is wrong otherwise. A bare ``ws://host`` would go
    to port 80, not the driver's 8080: its port must be given; a port must be 1..65535 (99999
    failed with a message about the connection)."""
    from urllib.parse import urlsplit

    shape = "must look like ws://host:port (the driver's default port is 8080)"
    if any(c.isspace() or not c.isprintable() for c in url):  # urlsplit drops some; websockets would not
        raise ValueError(f"{url!r} is not a websocket address: it has a space or control character")
    if "#" in url:
        raise ValueError(f"{url!r}: a websocket address has no #fragment")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # a port out of range or not a number, a bracketed host no IP address
        raise ValueError(f"{url!r} is not a websocket address: {exc} ({shape})") from None
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"{url!r} is not a websocket address: {shape}")
    bracketed = "[" in parts.netloc  # an IPv6 address, nothing else
    if not (_is_ip(parts.hostname) if bracketed else _HOST.fullmatch(parts.hostname) or _is_ip(parts.hostname)):
        raise ValueError(f"{url!r}: host {parts.hostname!r} is no host name or IP address (letters, digits, '.', "
                         "'-'; an IPv6 address in brackets)")
    if parts.username is not None and parts.password is None:
        raise ValueError(f"{url!r}: user info must be user:password (websockets refuses a user alone)")
    if port == 0:
        raise ValueError(f"{url!r}: port 0 is not allowed: must be 1..65535")
    if port is None and parts.scheme == "ws" and parts.path in ("", "/"):
        raise ValueError(f"{url!r} has no port: it would go to port 80 ({shape})")
    return url


class DriverClient:
    """One websocket connection to a driver; ``statuses()`` yields every message it pushes.

    A task reads the connection all the time, into a queue of the last MAX_BACKLOG statuses: a
    client kept connected between recordings (a scan script moving motors) stays connected.
    Without it, websockets stopped reading once 16 statuses waited, its keepalive timed out and
    the connection was gone about 40 s later. When more than MAX_BACKLOG wait unread, the oldest
    go. One task at a time may read the statuses: a second one that waits while the first does is
    refused (one that comes while a status is queued takes it: give each task its own client).
    """

    def __init__(self, url: str, *, open_timeout: float = 10.0) -> None:
        self.url = check_driver_url(url)
        self.open_timeout = open_timeout
        self._connection = None
        self._reader: asyncio.Task | None = None
        self._frames: deque[str | bytes] = deque(maxlen=MAX_BACKLOG)
        self._arrived: asyncio.Event | None = None
        self._ended: str | None = None  # how the connection ended (the reader saw it)
        self._reading = False  # a task waits in _receive
        self._entered = False  # between __aenter__ and close()

    async def __aenter__(self) -> DriverClient:
        from websockets.asyncio.client import connect

        if self._entered:  # connected, or connecting in another task
            raise DriverError(f"this client is already connected to the driver at {self.url}: one `async with` "
                              "at a time (or another DriverClient)")
        self._entered = True
        try:
            self._connection = await connect(self.url, open_timeout=self.open_timeout, close_timeout=1)
        except (OSError, TimeoutError) as exc:
            raise DriverError(f"cannot connect to the driver at {self.url}: {exc}") from None
        except Exception as exc:  # websockets' handshake errors
            raise DriverError(f"cannot connect to the driver at {self.url}: {type(exc).__name__}: {exc}") from None
        finally:
            self._entered = self._connection is not None  # not connected (an error, a cancel): enter again
        self._frames.clear()
        self._arrived, self._ended = asyncio.Event(), None
        self._reader = asyncio.ensure_future(self._read(self._connection))
        return self

    async def _read(self, connection) -> None:
        """Every frame into ``_frames`` until the connection ends; then ``_ended`` says how, and
        whoever waits in ``_receive`` is woken, however this task ends (close() cancels it)."""
        from websockets.exceptions import ConnectionClosed

        frames, half = self._frames, MAX_BACKLOG // 2
        ended = "this client closed the connection"
        try:
            while True:
                frames.append(await connection.recv())
                self._arrived.set()
                if len(frames) >= half:  # websockets hands buffered frames on without a pause:
                    await asyncio.sleep(0)  # let a reader take them before the oldest go
        except ConnectionClosed as exc:
            ended = (f"the driver at {self.url} stopped answering ({exc})" if "keepalive ping timeout" in str(exc)
                     else f"the driver at {self.url} closed the connection ({exc})")
        except Exception as exc:  # noqa: BLE001 - said to the reader, not lost in a task nobody awaits
            ended = f"reading from the driver at {self.url} failed: {type(exc).__name__}: {exc}"
        finally:
            self._ended = ended
            self._arrived.set()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await _cancel(self._reader)
        self._reader = None
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
        self._entered = False

    def _connected(self):
        """The websocket; DriverError if there is none (a client used before ``async with`` or after close)."""
        if self._connection is None:
            raise DriverError(f"not connected to the driver at {self.url}: use the client inside "
                              "`async with DriverClient(url) as client:` (it connects there and closes at its end)")
        return self._connection

    async def send(self, message: dict[str, Any]) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            await self._connected().send(json.dumps(message))
        except ConnectionClosed as exc:
            raise DriverError(f"the driver at {self.url} closed the connection before {message.get('command')} "
                              f"could be sent ({exc})") from None

    async def start(self, path: str, *, n_image: int | None = None, file_prefix: str | None = None,
                    writer_id: int | None = None, start_id: int | None = None) -> None:
        """Send start; only the given fields are sent (the driver applies its defaults)."""
        message: dict[str, Any] = {"command": "start", "path": str(path)}
        for key, value in (("n_image", n_image), ("file_prefix", file_prefix), ("writer_id", writer_id),
                           ("start_id", start_id)):
            if value is not None:
                message[key] = value
        await self.send(message)

    async def stop(self) -> None:
        await self.send({"command": "stop"})

    async def next_status(self, timeout: float | None = None) -> dict[str, Any]:
        """The next message the driver pushes; DriverError if the connection ends or times out."""
        frame = await self._receive(timeout)
        if frame is None:
            raise DriverError(f"no status from the driver at {self.url} for {timeout:g} s")
        return self._status(frame)

    async def newest_status(self, timeout: float | None = None) -> dict[str, Any]:
        """The newest message the driver pushed: the next one, or the last of those already
        waiting (and of those that come within 10 ms: on their way). A client kept connected
        without reading them has a backlog of old statuses (e.g. another client's whole run)."""
        message = await self.next_status(timeout)
        end = time.monotonic() + 0.5  # a driver pushing more often than every 10 ms keeps it no longer
        while time.monotonic() < end and (frame := await self._receive(0.01)) is not None:
            message = self._status(frame)
        return message

    async def _receive(self, timeout: float | None) -> str | bytes | None:
        """The next frame, None after ``timeout`` s; DriverError once the connection has ended."""
        self._connected()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._frames:
            if self._ended is not None:
                raise DriverError(self._ended)
            if self._reading:  # the statuses would be shared out between the two at random
                raise DriverError(f"another task already waits for the statuses of the driver at {self.url}: "
                                  "one reader per DriverClient (give the other task its own client)")
            self._arrived.clear()  # no await since the check: no frame can come in between
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            self._reading = True
            try:  # asyncio.timeout, not wait_for: Python 3.11's wait_for drops a cancel that comes
                async with asyncio.timeout(remaining):  # in the same step as the event
                    await self._arrived.wait()
            except TimeoutError:
                return None
            finally:
                self._reading = False
        return self._frames.popleft()

    def _status(self, frame: str | bytes) -> dict[str, Any]:
        """The status message in ``frame``; DriverError if it is not one."""
        try:
            message = json.loads(frame)
        except json.JSONDecodeError:
            raise DriverError(f"the driver sent a message that is not JSON: {frame!r:.80}") from None
        if not isinstance(message, dict) or "status" not in message:
            raise DriverError(f"the driver sent a message without status: {frame!r:.80}")
        count = message.get("count", 0)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise DriverError(f"the driver sent a count that is no integer >= 0: {frame!r:.80}")
        return message

    async def statuses(self, timeout: float | None = 5.0) -> AsyncIterator[dict[str, Any]]:
        """Every status message, for as long as the caller iterates (10 Hz at least)."""
        while True:
            yield await self.next_status(timeout)

    async def record(self, path: str, *, n_image: int | None = None, file_prefix: str | None = None,
                     start_id: int | None = None, writer_id: int | None = None,
                     on_status: Callable[[dict[str, Any]], None] | None = None,
                     stop_event: asyncio.Event | None = None, timeout: float = 10.0) -> RecordResult:
        """Start and follow one recording to file_saved / error / rejected.

        Setting ``stop_event`` sends stop once and keeps following until the files are closed.
        Leaving before the end by an exception (``on_status`` raised, the connection timed out) or
        a cancel (the caller's ``wait_for``) sends stop too: the run this call started must not go
        on without anybody following it (until stop, with no n_image). The driver then closes the
        files by itself (no stop is sent after the status that ended this call's run).

        A driver busy with another client's run (creating_file .. saving_file) gets no start: the
        result is ``rejected`` at once, as the driver would answer. Sent anyway, the start could
        arrive just after that run's end and start a run nobody follows, while this call took the
        other run's statuses (and its file_saved) for its own; a stop (Ctrl-C) before the driver's
        answer stopped the other client's run. The driver shows a previous run's end (file_saved or
        error) for a moment before it is idle again; the start is sent only once that has passed,
        so every final status after the start is this run's (or the answer to the start itself).
        Left (the protocol does not say whose a status is): two clients that both found the driver
        idle and sent a start within the time a start takes to reach it. The later one is
        rejected (its result then counts 0 images, whatever the other run counted); a stop it
        sends before that answer reaches it (a Ctrl-C) stops the other client's run.
        """
        first = await self.newest_status(timeout)  # not a backlog of old ones (another run's end)
        deadline = time.monotonic() + timeout
        while first["status"] in ("file_saved", "error") and time.monotonic() < deadline:
            first = await self.newest_status(timeout)
        if first["status"] in ACTIVE:
            message = {"status": "rejected", "reason": f"the driver is busy with another run (it is at "
                                                       f"{first['status']}): nothing was started"}
            if on_status is not None:
                on_status(message)
            return RecordResult("rejected", 0, message["reason"], statuses=[message], n_image=n_image)
        if stop_event is not None and stop_event.is_set():  # stopped while we waited: do not start at all
            return RecordResult("cancelled", 0, "stopped before the start was sent: nothing recorded",
                                n_image=n_image)
        started_at = time.time()
        await self.start(path, n_image=n_image, file_prefix=file_prefix, start_id=start_id, writer_id=writer_id)
        seen_busy = False
        stop_sent = False
        ended = False
        statuses: list[dict[str, Any]] = []
        stop_wait = asyncio.ensure_future(stop_event.wait()) if stop_event is not None else None
        receive = None
        try:
            while True:
                if stop_wait is not None and stop_wait.done() and not stop_sent:
                    await self.stop()
                    stop_sent = True
                receive = asyncio.ensure_future(self.next_status(timeout))
                waits = {receive} if stop_wait is None or stop_sent else {receive, stop_wait}
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if not receive.done():
                    await _cancel(receive)
                    continue
                message = receive.result()
                status = message["status"]
                statuses.append(message)
                # before on_status: once the run ended, a callback raising must not send a stop
                ended = status == "rejected" or (status == "error" and not seen_busy) or (seen_busy and status in FINAL)
                if on_status is not None:
                    on_status(message)
                if status in ACTIVE:
                    seen_busy = True
                    continue
                if ended:
                    files = list_files(path, "file" if file_prefix is None else file_prefix, since=started_at) if status == "file_saved" else []
                    count = 0 if status == "rejected" else _last_count(statuses)  # others' counts, if any
                    return RecordResult(status, count, message.get("reason"), files, statuses,
                                        n_image, stop_sent)
        finally:  # a task left pending would end later in an exception nobody retrieves (logged at exit)
            await _cancel(stop_wait, receive)
            if not ended and not stop_sent:
                await self._abandon()

    async def _abandon(self) -> None:
        """Stop the run a ``record`` leaves before its end, as far as the connection still allows
        (an exception or a cancel is on its way out: this adds none)."""
        if self._connection is None:
            return
        try:
            await asyncio.wait_for(self.stop(), 2.0)
        except (DriverError, TimeoutError, asyncio.CancelledError):
            return


async def _cancel(*tasks: asyncio.Future | None) -> None:
    """Cancel the pending ones of ``tasks`` and wait for them to end."""
    pending = [task for task in tasks if task is not None and not task.done()]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def _last_count(statuses: list[dict[str, Any]]) -> int:
    for message in reversed(statuses):
        if "count" in message:
            return int(message["count"])
    return 0


def list_files(path: str | Path, prefix: str, since: float = 0.0) -> list[Path]:
    """The files a recording wrote: ``<prefix><i>.h5``, ``<prefix>Meta.h5``, ``<prefix>_master.h5``.

    Only files changed since ``since`` (a few seconds of slack for file-system clocks) are listed,
    so files of an earlier recording with more writers are not taken for this one's. Empty when
    the directory is not visible from here (the driver may run on another host).
    """
    pattern = re.compile(re.escape(prefix) + r"(\d+|Meta|_master)\.h5")
    directory = Path(path)
    try:
        entries = sorted(directory.iterdir())
    except OSError:
        return []
    found = []
    for entry in entries:
        if pattern.fullmatch(entry.name):
            try:
                if entry.stat().st_mtime >= since - 5:
                    found.append(entry)
            except OSError:
                continue
    return found


def record(url: str, path: str, *, n_image: int | None = None, file_prefix: str | None = None,
           start_id: int | None = None, on_status: Callable[[dict[str, Any]], None] | None = None) -> RecordResult:
    """Blocking form of ``DriverClient.record``.

    A Ctrl-C (KeyboardInterrupt) stops the recording, as in ``stddaq record``: stop is sent, the
    driver's closing of the files is waited for, then KeyboardInterrupt is raised, so a scan
    script stops too. A second Ctrl-C leaves at once (the driver then ends the run alone).
    """

    async def run() -> RecordResult:
        async with DriverClient(url) as driver:
            stop = asyncio.Event()
            following = asyncio.ensure_future(driver.record(path, n_image=n_image, file_prefix=file_prefix,
                                                            start_id=start_id, on_status=on_status,
                                                            stop_event=stop))
            try:
                return await asyncio.shield(following)
            except asyncio.CancelledError:  # Ctrl-C: asyncio.run cancels this task, then raises KeyboardInterrupt
                stop.set()
                await following  # a second Ctrl-C ends asyncio.run here
                raise

    return asyncio.run(run())


# ---------------------------------------------------------------------- `stddaq record`
class Progress:
    """A one-line progress bar with the rate of the last second (plain lines when not a terminal)."""

    def __init__(self, total: int, out, *, width: int = 30, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.out = out
        self.width = width
        self.clock = clock
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self._samples: list[tuple[float, int]] = []
        self._last_status: str | None = None
        self._last_line = 0.0
        self._count = 0

    def rate(self, now: float, count: int) -> float:
        self._samples.append((now, count))
        while len(self._samples) > 2 and now - self._samples[0][0] > 1.0:
            self._samples.pop(0)
        t0, c0 = self._samples[0]
        return (count - c0) / (now - t0) if now > t0 else 0.0

    def line(self, message: dict[str, Any], now: float) -> str:
        status = message["status"]
        count = self._count = int(message.get("count", self._count))  # file_saved has no count: keep the last
        rate = self.rate(now, count)
        filled = min(self.width, self.width * count // self.total) if self.total else 0
        bar = "#" * filled + "." * (self.width - filled)
        return f"[{bar}] {count}/{self.total} images {rate:8.1f} img/s  {status}"

    def update(self, message: dict[str, Any]) -> None:
        now = self.clock()
        status = message["status"]
        text = self.line(message, now)
        if self.tty:
            self.out.write("\r" + text.ljust(78))
            if status in FINAL:
                self.out.write("\n")
        elif status != self._last_status or now - self._last_line >= 1.0 or status in FINAL:
            self.out.write(text + "\n")
            self._last_line = now
        self._last_status = status
        self.out.flush()


def record_command(url: str, path: str, n_images: int, prefix: str | None = None, start_id: int | None = None,
                   out=None) -> int:
    """`stddaq record`: exit 0 only when the files were saved with every image asked for, or with
    fewer after a Ctrl-C here (stop sent, the files waited for); a run another client stopped
    early exits 1.

    Progress goes to ``out`` (stderr), the list of files to stdout, so a script can take it.
    """
    import signal
    import sys

    out = out or sys.stderr
    progress = Progress(n_images, out)

    async def run() -> RecordResult:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        presses = 0

        def on_interrupt() -> None:
            nonlocal presses
            presses += 1
            if presses == 1:
                out.write("\nstopping: waiting for the writers to close the files (Ctrl-C again to leave now)\n")
                stop.set()
            else:
                task.cancel()

        loop.add_signal_handler(signal.SIGINT, on_interrupt)
        loop.add_signal_handler(signal.SIGTERM, on_interrupt)
        try:
            async with DriverClient(url) as driver:
                return await driver.record(path, n_image=n_images, file_prefix=prefix, start_id=start_id,
                                           on_status=progress.update, stop_event=stop)
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)

    try:
        result = asyncio.run(run())
    except DriverError as exc:
        print(f"stddaq record: error: {exc}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        print("stddaq record: left before the driver confirmed the files (the recording goes on or ends "
              "without this client)", file=sys.stderr)
        return 1
    if not result.ok:
        print(f"stddaq record: {result.status}: {result.reason or 'no reason given'} "
              f"(last count: {result.count} images)", file=sys.stderr)
        return 1
    print(f"recorded {result.count} images; files:")
    for file in result.files:
        print(f"  {file}")
    if not result.files:
        print(f"  (not visible from here: {path}/{'file' if prefix is None else prefix}*.h5 on the driver's host)")
    if result.complete:
        return 0
    if result.stop_sent:  # Ctrl-C here: the user asked for it
        print(f"stddaq record: stopped (Ctrl-C) after {result.count} of {result.n_image} images", file=sys.stderr)
        return 0
    # the files are good, but somebody else stopped the run: a script must not take it as done
    print(f"stddaq record: incomplete: stopped by another client of the driver after {result.count} of "
          f"{result.n_image} images", file=sys.stderr)
    return 1
