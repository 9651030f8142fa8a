"""The shape every service shares: lifecycle, stop flag, fatal-error handling and ``main()``.

A service subclasses ``Service`` and fills in ``_start()`` (bind/connect/map), ``_step()`` (one
bounded slice of its loop, returning quickly so ``stop()`` is seen) and ``_close()`` (release
what ``_start`` took). ``run()`` repeats ``_step`` until stopped; ``close()`` releases resources
and re-raises a fatal error stored by ``run()``. ``service_main`` turns a service into a console
script: argument errors and config errors exit 2, runtime failures exit 1, SIGTERM/SIGINT stop
cleanly.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from typing import Any

import zmq

from stddaq.config import DetectorConfig
from stddaq.errors import ConfigError, StddaqError, UsageError
from stddaq.stats import Stats

log = logging.getLogger(__name__)


class State(StrEnum):
    created = "created"
    running = "running"
    stopped = "stopped"
    failed = "failed"


class Service:
    """Base of every stddaq service process (see module docstring)."""

    name = "service"

    def __init__(self, config: DetectorConfig, *, ctx: zmq.Context | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.ctx = ctx
        self._own_ctx = ctx is None
        self.state = State.created
        self.endpoints: dict[str, str] = {}
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._fatal: BaseException | None = None
        self._closed = False
        self.counters = Stats(config.detector_name, self.name, config.stats_collection_period, clock=clock)

    # ------------------------------------------------------------------ to implement
    def _start(self) -> None:
        raise NotImplementedError

    def _step(self) -> bool:
        """One slice of work; return False when the service is finished by itself."""
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Service:
        if self.ctx is None:
            self.ctx = zmq.Context()
        try:
            self._start()
        except BaseException:
            self.state = State.failed
            self.close_quietly()
            raise
        self.state = State.running
        return self

    def run(self) -> None:
        """Block until stopped, finished or failed (a failure is re-raised by ``close()``)."""
        if self.state is State.created:
            self.start()
        try:
            while not self._stop.is_set():
                if not self._step():
                    break
                self.counters.tick()
        except BaseException as exc:  # noqa: BLE001 - stored and re-raised by close()
            self._fatal = exc
            self.last_error = str(exc)
            self.state = State.failed
            log.debug("%s failed", self.name, exc_info=True)
            return
        self.state = State.stopped

    def stop(self) -> None:
        """Thread- and signal-safe: the loop ends within one step."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stats(self) -> Mapping[str, int]:
        """Counters since start (a frozen snapshot)."""
        return self.counters.totals()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._close()
            finally:
                if self._own_ctx and self.ctx is not None:
                    if self.state is State.failed:
                        self.ctx.destroy(linger=0)  # a socket a failed start or step left open must not make term() wait forever
                    else:
                        self.ctx.term()
                    self.ctx = None
        if self._fatal is not None:
            fatal, self._fatal = self._fatal, None
            raise fatal

    def close_quietly(self) -> None:
        try:
            self.close()
        except BaseException:  # noqa: BLE001
            log.debug("error while closing %s", self.name, exc_info=True)

    def __enter__(self) -> Service:
        if self.state is State.created:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.close()


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors become UsageError (one line, exit 2) instead of printing usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def number_type(parse: Callable[[str], Any], what: str, allowed: str, ok: Callable[[Any], bool],
                 name: str) -> Callable[[str], Any]:
    """An argparse ``type=`` that names the bad value and what is allowed (one line, exit 2)."""
    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{value} is not allowed: must be {allowed}")
        return value

    convert.__name__ = name
    return convert


_ASCII_INT = re.compile(r"[+-]?[0-9]+")


def ascii_int(text: str) -> int:
    """An integer written as such on a command line: ASCII digits, an optional sign. Python's
    ``int()`` also takes "٥" or "５" (5), " 16" and "1_000"; ValueError for those."""
    if not _ASCII_INT.fullmatch(text):
        raise ValueError(f"{text!r} is not an integer")
    return int(text)


positive_int = number_type(ascii_int, "an integer", "> 0", lambda v: v > 0, "positive_int")
#: a count that libzmq keeps in a C int (a high-water mark)
MAX_C_INT = 2**31 - 1
c_int_count = number_type(ascii_int, "an integer", f"1..{MAX_C_INT}", lambda v: 0 < v <= MAX_C_INT, "c_int_count")
non_negative_int = number_type(ascii_int, "an integer", ">= 0", lambda v: v >= 0, "non_negative_int")
port_number = number_type(ascii_int, "an integer", "a TCP port 0..65535 (0: any free port)", lambda v: 0 <= v <= 65535,
                           "port_number")
non_negative_float = number_type(float, "a number", "a finite number >= 0", lambda v: 0 <= v < math.inf,
                                  "non_negative_float")
positive_float = number_type(float, "a number", "a finite number > 0", lambda v: 0 < v < math.inf, "positive_float")


def setup_logging(level: int) -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)


#: environment variable: seconds after a stop signal at which a service still running prints
#: its threads' tracebacks (a diagnostic; unset: never)
STOP_REPORT_ENV = "STDDAQ_STOP_REPORT"
#: signals that stop a service cleanly (SIGHUP: its terminal or ssh session went away)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def handle_stop_signals(handler: Callable[[int, Any], None]) -> dict[int, Any]:
    """Install ``handler`` for STOP_SIGNALS; the previous handlers, to restore. A signal set to be
    ignored stays ignored (``nohup`` ignores SIGHUP so that the process outlives its terminal)."""
    previous = {}
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, handler)
    return previous
#: set by `stddaq up` for its children: the supervisor's pid
SUPERVISOR_ENV = "STDDAQ_SUPERVISOR_PID"
#: set by `stddaq up` for its children: ``FD:PATH``, the config file PATH as the supervisor read it
#: at its start, in the inherited file descriptor FD (a restarted child must not read an edit)
CONFIG_SNAPSHOT_ENV = "STDDAQ_CONFIG_SNAPSHOT"


def load_config(path: str) -> DetectorConfig:
    """The config ``path``; under `stddaq up`, the text the supervisor read from it at its start.
    A service it restarts (after a crash) must run the deployment the others run, not what an
    operator has since edited in the file for a next run (another image size replaced the ring
    buffer under the readers; a broken edit stopped the deployment)."""
    snapshot = os.environ.get(CONFIG_SNAPSHOT_ENV, "")
    fd, _, snapshot_path = snapshot.partition(":")
    if not fd.isdigit() or snapshot_path != path:  # not started by `up`, or with another config
        return DetectorConfig.load(path)
    del os.environ[CONFIG_SNAPSHOT_ENV]  # read once: the fd is closed below, its number may be reused
    try:
        text = os.pread(int(fd), os.fstat(int(fd)).st_size, 0).decode("utf-8")
        os.close(int(fd))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the copy `stddaq up` passed in file descriptor {fd}: {exc}") from None
    return DetectorConfig.loads(text, source=path)


def die_with_supervisor() -> None:
    """Under `stddaq up`: get SIGTERM when the supervisor is gone, however it ended (SIGKILL
    too), instead of running on orphaned with its shm and sockets (Linux PR_SET_PDEATHSIG).
    The kernel forgets this when the process changes its effective uid or gid: call it again
    after each change (the writer's switch_user)."""
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if not supervisor or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != supervisor:  # it ended before the call above
        os.kill(os.getpid(), signal.SIGTERM)


def service_main(prog: str, parser: ArgumentParser, build: Callable[[DetectorConfig, Any], Service],
                 argv: Sequence[str] | None = None) -> int:
    """Parse, load the config (argument ``detector_json_filename``), run, map errors to exit codes."""
    parser.prog = prog
    try:
        args = parser.parse_args(argv)
        config = load_config(args.detector_json_filename)
        setup_logging(config.python_log_level)
        service = build(config, args)
    except StddaqError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("%s: %s received, stopping", prog, signal.Signals(signum).name)
        # with STDDAQ_STOP_REPORT=S, a service that has not ended S seconds later prints where each
        # of its threads is (the tests set it: a rare driver hang at stop was seen in CI, cause unknown)
        report = os.environ.get(STOP_REPORT_ENV)
        if report:
            faulthandler.dump_traceback_later(float(report), exit=False)
        service.stop()

    previous = handle_stop_signals(_on_signal)
    die_with_supervisor()
    try:
        service.start()
        service.run()
        try:
            service.close()
        finally:  # after close: what a service finishes while closing (a stage's last images) is in it
            service.counters.flush()
    except StddaqError as exc:
        service.close_quietly()
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - one line for the operator, details at debug
        service.close_quietly()
        log.debug("%s failed", prog, exc_info=True)
        print(f"{prog}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0
