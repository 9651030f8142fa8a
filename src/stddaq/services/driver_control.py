"""The driver's control protocol (SPEC 8) as pure functions: commands, statuses, pre-flight.

Nothing here touches a socket: ``parse_command`` turns one websocket text frame into a
``StartCommand``/``StopCommand`` or raises ``CommandError`` with the reason the client gets back;
``preflight`` checks a start against the file system before any file is created and raises
``PreflightError``; ``Status`` names the states and ``status_message`` builds the JSON the
driver pushes. The driver service (services/driver.py) wires these to its sockets.
"""

from __future__ import annotations

import json
import os
import pwd
import stat
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

#: The default ``n_image`` of a start (upstream: the largest GigaFRoST frame count of gfclient).
DEFAULT_N_IMAGE = 16_777_215
COMMANDS = ("start", "stop")
START_KEYS = ("path", "file_prefix", "n_image", "writer_id", "start_id")


class Status(StrEnum):
    idle = "idle"
    creating_file = "creating_file"
    waiting_for_first_image = "waiting_for_first_image"
    recording = "recording"
    saving_file = "saving_file"
    file_saved = "file_saved"
    stop = "stop"
    error = "error"


#: While the driver is in one of these, a start is rejected ("driver is busy!").
BUSY = frozenset({Status.creating_file, Status.waiting_for_first_image, Status.recording, Status.stop,
                  Status.saving_file})
#: Statuses whose message carries ``count``.
WITH_COUNT = frozenset({Status.recording, Status.saving_file})


class CommandError(ValueError):
    """A websocket message that is not a valid command; ``str()`` is the reason sent back."""


class PreflightError(ValueError):
    """A start that cannot be recorded (directory, permissions, space); ``str()`` is the reason."""


@dataclass(frozen=True)
class StartCommand:
    path: str
    file_prefix: str = "file"
    n_image: int = DEFAULT_N_IMAGE
    writer_id: int = 0
    start_id: int = 0
    n_image_given: bool = False

    def raw_file(self, index: int) -> Path:
        """``<path>/<prefix><i>.h5``, the file of writer ``index`` (upstream naming)."""
        return Path(self.path) / f"{self.file_prefix}{index}.h5"

    @property
    def meta_file(self) -> Path:
        return Path(self.path) / f"{self.file_prefix}Meta.h5"

    @property
    def master_file(self) -> Path:
        return Path(self.path) / f"{self.file_prefix}_master.h5"


@dataclass(frozen=True)
class StopCommand:
    pass


def parse_command(text: str | bytes) -> StartCommand | StopCommand:
    """One websocket frame -> a command; CommandError says what is wrong and what is allowed."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # ValueError: also an int of > 4300 digits
        shown = text if len(text) <= 60 else text[:57] + "..."
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise CommandError(f"message is not valid JSON ({reason}): {shown!r}") from None
    if not isinstance(data, dict):
        raise CommandError(f"message must be a JSON object like {{\"command\": \"start\", ...}}, got {type(data).__name__}")
    command = data.get("command")
    if command not in COMMANDS:
        if command is None:
            raise CommandError("message has no \"command\" (allowed: start, stop)")
        raise CommandError(f"unknown command {command!r} (allowed: start, stop)")
    if command == "stop":
        return StopCommand()
    return _parse_start(data)


def _parse_start(data: dict[str, Any]) -> StartCommand:
    _check_keys(data)
    path = data.get("path")
    if path is None:
        raise CommandError("start needs \"path\": the directory to write into")
    if not isinstance(path, str) or not path.strip():
        raise CommandError(f"start: \"path\" must be a non-empty string, got {path!r}")
    prefix = data.get("file_prefix", "file")
    if not isinstance(prefix, str) or "/" in prefix or "\0" in prefix:
        raise CommandError(f"start: \"file_prefix\" must be a file name prefix without '/', got {prefix!r}")
    values = {}
    for key, default, minimum in (("n_image", DEFAULT_N_IMAGE, 1), ("writer_id", 0, 0), ("start_id", 0, 0)):
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise CommandError(f"start: {key!r} must be an integer >= {minimum}, got {value!r}")
        if value < minimum:
            raise CommandError(f"start: {key!r} is {value}, must be an integer >= {minimum}")
        values[key] = value
    if values["start_id"] >= 2**64:
        raise CommandError(f"start: 'start_id' is {values['start_id']}, must be < 2**64")
    if values["writer_id"] >= 2**31:
        raise CommandError(f"start: 'writer_id' is {values['writer_id']}, must be a uid < 2**31")
    return StartCommand(path=path, file_prefix=prefix, n_image_given="n_image" in data, **values)


def _check_keys(data: dict[str, Any]) -> None:
    """A field that is a start field misspelt (``n_images``, ``startid``, ``N_Image``: the same but
    for case, ``_``/``-``/spaces and a trailing ``s``) while that field is missing is refused: it would
    leave the default (n_image: record until stop). Other fields are ignored, as upstream's
    driver does: a client may send more than the driver reads."""
    for key in data:
        if key in START_KEYS or key == "command":
            continue
        meant = _SPELLINGS.get(_spelling(str(key)))
        if meant is not None and meant not in data:
            raise CommandError(f"start: unknown field {key!r}: did you mean {meant!r}? (start fields: "
                               f"{', '.join(START_KEYS)})")


def _spelling(key: str) -> str:
    return key.lower().replace("_", "").replace("-", "").replace(" ", "").removesuffix("s")


_SPELLINGS = {_spelling(key): key for key in START_KEYS}


def status_message(status: Status, *, count: int = 0, reason: str | None = None) -> dict[str, Any]:
    """The JSON object of a status push (SPEC 8): count only where the spec has it, reason on error."""
    message: dict[str, Any] = {"status": str(status)}
    if status in WITH_COUNT:
        message["count"] = count
    if status is Status.error or reason is not None:
        message["reason"] = reason or "unknown error"
    return message


# ---------------------------------------------------------------------- pre-flight
def writable_by(path: Path, uid: int) -> bool:
    """Could user ``uid`` create a file in directory ``path``? (permission bits, owner, groups)

    Used when ``switch_user_active``: the writers write as the requested uid, so checking our own
    access (often root) would say yes to a directory the user cannot write.
    """
    st = os.stat(path)
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IWUSR) and bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in groups_of(uid):
        return bool(st.st_mode & stat.S_IWGRP) and bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IWOTH) and bool(st.st_mode & stat.S_IXOTH)


def groups_of(uid: int) -> set[int]:
    """The groups of user ``uid`` (primary and supplementary); none for a uid without a passwd entry."""
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return set()  # a uid without a passwd entry has no supplementary groups we can know
    return set(os.getgrouplist(user.pw_name, user.pw_gid))  # through NSS: network (LDAP, sssd) groups too


@dataclass(frozen=True)
class Preflight:
    """What the pre-flight found: free bytes, and how many images fit (for the log)."""

    free_bytes: int
    images_that_fit: int


def preflight(start: StartCommand, *, recording_bytes: Callable[[int], int], files: list[Path],
              switch_user: bool) -> Preflight:
    """Check ``start`` before any file exists: directory, writable (as the uid), no overwrite, room.

    ``files`` are the files this recording would create; an existing one is refused, never
    overwritten. ``recording_bytes(n)``: at most the bytes a recording of n images takes
    (``storage.hdf5.recording_bytes``: files, chunks, reserves). With the default n_image
    (record until stop) the space check does not refuse: the caller reports how many images fit
    instead. A path the system cannot even look at (a name longer than it allows) is refused too,
    as every other PreflightError.
    """
    try:
        return _preflight(start, recording_bytes=recording_bytes, files=files, switch_user=switch_user)
    except OSError as exc:
        raise PreflightError(f"cannot use {exc.filename or start.path}: {exc.strerror or exc}") from None


def _preflight(start: StartCommand, *, recording_bytes: Callable[[int], int], files: list[Path],
               switch_user: bool) -> Preflight:
    path = Path(start.path)
    if not path.is_absolute():
        raise PreflightError(f"path {start.path!r} must be absolute (the driver's working directory is not yours)")
    if not path.exists():
        raise PreflightError(f"path {start.path} does not exist (create the directory first)")
    if not path.is_dir():
        raise PreflightError(f"path {start.path} is not a directory")
    if switch_user:
        if not writable_by(path, start.writer_id):
            raise PreflightError(f"path {start.path} is not writable by user id {start.writer_id} (writer_id)")
    elif not os.access(path, os.W_OK | os.X_OK):
        raise PreflightError(f"path {start.path} is not writable by the driver's user (uid {os.geteuid()})")
    for file in files:
        if file.exists():
            raise PreflightError(f"file {file} already exists: choose another path or file_prefix "
                                 f"(stddaq never overwrites data)")
    vfs = os.statvfs(path)
    free = vfs.f_bavail * vfs.f_frsize
    fit = images_that_fit(recording_bytes, free)
    if start.n_image_given and (need := recording_bytes(start.n_image)) > free:
        raise PreflightError(f"not enough space in {start.path}: {start.n_image} images need {_size(need)} with "
                             f"their files' overhead, {_size(free)} free (room for {fit} images)")
    return Preflight(free, fit)


def images_that_fit(recording_bytes: Callable[[int], int], free: int) -> int:
    """The most images a recording can take in ``free`` bytes (``recording_bytes`` grows with them)."""
    low, high = 0, 1
    while recording_bytes(high) <= free:
        low, high = high, high * 2
        if high > 1 << 62:
            return low
    while high - low > 1:  # recording_bytes(low) fits, recording_bytes(high) does not
        middle = (low + high) // 2
        low, high = (middle, high) if recording_bytes(middle) <= free else (low, middle)
    return low


def _size(n_bytes: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} bytes"
