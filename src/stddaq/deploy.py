"""`stddaq up`: start the services one config describes, keep them running, stop them all.

The supervisor owns its child processes: it forwards their output line by line with the
service's name in front, restarts one that ended (crashed, or was stopped from outside: every
service runs until the deployment stops), with a growing pause, and gives up after a few quick
ends in a row (a child that exits 2, a usage or config error, is not restarted: it would fail
the same way). Every child, a restarted one too, reads the config as ``up`` read it at its start
(``config_snapshot``), not the file as edited since. On Ctrl-C/SIGTERM/SIGHUP it stops them all. First the services
that must finish their work with the others still running (the writer driver saves the files of
a recording, which needs its writers), each with its own grace period; then the rest, consumers
before producers: SIGTERM, then SIGKILL for any that has not ended after the grace period. The
children get SIGTERM from the kernel if the supervisor itself dies (even by SIGKILL). Once all
have ended, ipc sockets and shm objects of the detector that a killed child left are removed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from stddaq.bus.ram_buffer import GUARD_SUFFIX, check_shm_room, shm_allocated
from stddaq.bus.sockets import ipc_in_use
from stddaq.config import MIN_SLOTS, STAGE_SUFFIXES, DetectorConfig, read_config_text
from stddaq.errors import UsageError
from stddaq.services.base import CONFIG_SNAPSHOT_ENV, SUPERVISOR_ENV, handle_stop_signals

log = logging.getLogger("stddaq.up")

DEMO_RATE_HZ = 1000
DRIVER_PORT = 8080  # the writer driver's websocket, upstream's default
MAX_QUICK_RESTARTS = 5
#: how long a stopping driver may take to save a recording (confirm, close, master) before it is killed
DRIVER_STOP_GRACE = 60.0
#: exit code of a service refusing its arguments or config: restarting it would fail the same way
USAGE_EXIT = 2
QUICK = 10.0  # a child that dies sooner than this after its start counts as a quick crash


def demo_config_text() -> str:
    return resources.files("stddaq").joinpath("data/demo.json").read_text(encoding="utf-8")


@dataclass
class ServiceSpec:
    """One child process of the deployment."""

    name: str
    argv: list[str]
    #: stopped (and waited for, up to ``grace`` s) before all the others: it needs them to finish
    stop_first: bool = False
    grace: float | None = None  # None: the supervisor's


@dataclass
class _Child:
    spec: ServiceSpec
    process: subprocess.Popen | None = None
    started: float = 0.0
    quick_crashes: int = 0
    restart_at: float | None = None
    ends: int = 0  # times it ended by itself (crashed, or stopped from outside) and was restarted
    threads: list[threading.Thread] = field(default_factory=list)


def listening_ports(config: DetectorConfig, driver_port: int = DRIVER_PORT) -> list[tuple[str, str, int]]:
    """(service, host, port) of every TCP port the deployment of ``config`` listens on."""
    ports = []
    for address in config.live_stream_configs:
        host, _, port = address.removeprefix("tcp://").rpartition(":")
        if address.startswith("tcp://") and port.isdigit():
            ports.append((f"std_live_stream {address}", "0.0.0.0" if host in ("*", "") else host.strip("[]"),
                          int(port)))
    if config.number_of_writers > 0:
        ports.append(("std_det_driver (websocket)", "0.0.0.0", driver_port))
    return ports


_ANY = ("0.0.0.0", "::")


def check_ports_free(ports: list[tuple[str, str, int]]) -> None:
    """UsageError naming the first port a service could not listen on (and what to do), before
    anything starts: otherwise that service crash-loops until the supervisor gives up. Two
    services wanting the same port are named too, and a host that is no address, name or
    interface of this machine. An interface name (zmq binds those, e.g. ``tcp://eth0:9100``)
    is not checked: the service says."""
    for index, (service, host, port) in enumerate(ports):
        for other, other_host, other_port in ports[:index]:
            if port == other_port and port != 0 and (host == other_host or host in _ANY or other_host in _ANY):
                raise UsageError(f"{service} and {other} both want port {port} ({other_host} and {host})")
        try:
            family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                 flags=socket.AI_PASSIVE)[0]
        except (UnicodeError, ValueError) as exc:  # not even a name: "a..b", a label over 63, a NUL
            raise UsageError(f"{service} cannot listen on {host!r}:{port}: no host name or address ({exc})") from None
        except socket.gaierror as exc:
            try:
                socket.if_nametoindex(host)  # an interface name (zmq binds those): not checked here
            except (OSError, ValueError):  # ValueError: a NUL in it
                shown = host if host.isprintable() else repr(host)  # a NUL must not reach the terminal
                raise UsageError(f"{service} cannot listen on {shown}:{port}: {host!r} is no interface, address or "
                                 f"resolvable name of this machine ({exc.strerror}; use *, an interface name such "
                                 "as eth0, or one of this machine's addresses)") from None
            continue
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as zmq and websockets bind
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    hint = ("stop what listens there or pass another one with --driver-port" if "driver" in service
                            else "stop what listens there or change the address in live_stream_configs")
                    raise UsageError(f"{service} cannot listen on {host}:{port}: the port is in use ({hint})") from None
                raise UsageError(f"{service} cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def plan(config: DetectorConfig, config_path: Path, *, demo: bool = False,
         driver_port: int = DRIVER_PORT) -> list[ServiceSpec]:
    """The services a config asks for, in start order (producers of a channel first)."""
    py = [sys.executable, "-m"]
    path = str(config_path)
    specs = [
        ServiceSpec("std_sim", py + ["stddaq.services.simulator", path, "--rate", str(DEMO_RATE_HZ if demo else 100)]),
    ]
    for codec, stage in config.compression_stages.items():  # only those the config asks for
        option = ["-l", str(stage.level)] if codec == "blosc2" else ["-b", str(stage.block_size)]
        specs.append(ServiceSpec(f"std_data_compress_{codec}",
                                 py + ["stddaq.services.compress", codec, path, "-t", str(stage.threads), *option]))
    specs.append(ServiceSpec("std_bus_monitor", py + ["stddaq.services.monitor", path, "--verify", "ramp"]))
    # one std_live_stream per configured address; it reads its mode from live_stream_configs itself
    specs += [ServiceSpec(f"std_live_stream {address}", py + ["stddaq.services.live_stream", path, address])
              for address in config.live_stream_configs]
    if config.number_of_writers > 0:  # HDF5 writing: the writers first, then the driver that drives them
        specs += [ServiceSpec(f"std_det_writer-{i}", py + ["stddaq.services.writer", path, str(i)])
                  for i in range(config.number_of_writers)]
        specs.append(ServiceSpec("std_det_writer-meta", py + ["stddaq.services.writer", path, "meta"]))
        specs.append(ServiceSpec("std_det_driver", py + ["stddaq.services.driver", path, "-m",
                                                         "-p", str(driver_port)],
                                 stop_first=True, grace=DRIVER_STOP_GRACE))
    return specs


class Supervisor:
    """Runs a list of ServiceSpec as child processes until ``stop()``."""

    def __init__(self, specs: list[ServiceSpec], *, grace: float = 5.0, backoff: float = 0.5, out=None,
                 leftovers: list[Path] = (), env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = ()) -> None:
        self.children = [_Child(spec) for spec in specs]
        self.env = dict(env or {})  # for every child, beside ours (config_snapshot's)
        self.pass_fds = pass_fds
        self.leftovers = list(leftovers)  # the deployment's ipc sockets and shm objects (deployment_paths)
        self.grace = grace
        self.backoff = backoff
        self._stop = threading.Event()
        self._out = out or sys.stdout
        self._out_lock = threading.Lock()
        self.failed: str | None = None

    def _spawn(self, child: _Child) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{SUPERVISOR_ENV: str(os.getpid())}, **self.env)
        child.process = subprocess.Popen(child.spec.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                         pass_fds=self.pass_fds)
        child.started = time.monotonic()
        child.restart_at = None
        thread = threading.Thread(target=self._forward, args=(child.spec.name, child.process), daemon=True)
        thread.start()
        child.threads.append(thread)
        log.info("started %s (pid %d)", child.spec.name, child.process.pid)

    def _forward(self, name: str, process: subprocess.Popen) -> None:
        """Print the child's lines; if our output breaks (``stddaq up | head``), keep reading
        them: a child whose pipe is full blocks in its next log line, and its data flow with it."""
        printing = True
        for raw in process.stdout:
            if not printing:
                continue
            line = raw.decode("utf-8", "replace").rstrip("\n")
            try:
                with self._out_lock:
                    print(f"[{name}] {line}", file=self._out, flush=True)
            except (OSError, ValueError):
                printing = False
        process.stdout.close()

    def stop(self) -> None:
        self._stop.set()

    def run(self, duration: float | None = None) -> int:
        deadline = None if duration is None else time.monotonic() + duration
        try:
            for child in self.children:  # inside: if one cannot start, those started are stopped
                self._spawn(child)
            while not self._stop.wait(0.1):
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if not self._watch():
                    break
        finally:
            self._terminate()
        return 1 if self.failed else 0

    def _watch(self) -> bool:
        now = time.monotonic()
        for child in self.children:
            proc = child.process
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._spawn(child)
                continue
            if proc is None or proc.poll() is None:
                continue
            code = proc.returncode  # every service runs until stopped: any end is restarted, even exit 0
            # (an operator's SIGTERM or kill of one pid: the deployment would run on without it)
            if code == USAGE_EXIT:
                self.failed = f"{child.spec.name} refused its arguments or config (exit code 2: see its message above)"
                log.error("%s; stopping the deployment", self.failed)
                return False
            child.quick_crashes = child.quick_crashes + 1 if now - child.started < QUICK else 1
            if child.quick_crashes > MAX_QUICK_RESTARTS:
                self.failed = f"{child.spec.name} crashed {child.quick_crashes} times in a row (exit code {code})"
                log.error("%s; stopping the deployment", self.failed)
                return False
            child.ends += 1
            pause = min(self.backoff * 2 ** (child.quick_crashes - 1), 10.0)
            log.warning("%s exited with code %d%s; restarting in %.1f s", child.spec.name, code,
                        " (it was stopped from outside the deployment?)" if code == 0 else "", pause)
            child.restart_at = now + pause
        return True

    def _terminate(self) -> None:
        first = [c for c in self.children if c.spec.stop_first]
        rest = [c for c in reversed(self.children) if not c.spec.stop_first]  # consumers first, producers last
        killed = self._stop_children(first) + self._stop_children(rest)
        for child in self.children:
            for thread in child.threads:
                thread.join(timeout=2)
        if killed:
            self.failed = self.failed or f"{', '.join(killed)} did not stop in time and was killed"
        ended = [f"{c.spec.name} {c.ends} time(s)" for c in self.children if c.ends]
        if ended:  # it ran on, but not as asked: a script checking the exit code must know
            self.failed = self.failed or f"services ended by themselves and were restarted: {', '.join(ended)}"
            log.error("%s (see their lines above)", self.failed)
        self._remove_leftovers()  # of a killed or crashed child (the others removed theirs)

    def _stop_children(self, children: list[_Child]) -> list[str]:
        """SIGTERM each, wait up to its grace, SIGKILL the late ones; the names of those killed."""
        running = [c for c in children if c.process is not None and c.process.poll() is None]
        for child in running:
            child.process.send_signal(signal.SIGTERM)
        killed = []
        start = time.monotonic()
        for child in running:
            grace = self.grace if child.spec.grace is None else child.spec.grace
            try:
                child.process.wait(max(0.0, start + grace - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) did not stop within %.1f s; killing it", child.spec.name, child.process.pid,
                            grace)
                child.process.kill()
                child.process.wait()
                killed.append(child.spec.name)
        return killed

    def _remove_leftovers(self) -> None:
        """What killed or crashed children could not remove: the deployment's ipc sockets and shm
        objects (every process of the deployment has ended, and ``up`` checked that no other
        one uses these names: none of them is in use)."""
        for path in self.leftovers:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("cannot remove %s, left by a killed or crashed service: %s", path, exc.strerror)
                continue
            log.info("removed %s, left by a killed or crashed service", path)


def deployment_channels(config: DetectorConfig) -> list[str]:
    """The bus channels (suffixes) the services ``plan`` starts write: the image and each stage's."""
    return ["image", *(STAGE_SUFFIXES[codec] for codec in config.compression_stages)]


def deployment_paths(config: DetectorConfig) -> list[Path]:
    """The ipc socket files and shm objects the services ``plan`` starts make (named exactly:
    another detector's names may begin with this one's)."""
    channels = deployment_channels(config)
    links = [f"{kind}-{key}" for key in [*range(config.number_of_writers), "meta"] for kind in ("driver", "writer")]
    paths = [Path(config.ipc_address(name).removeprefix("ipc://")) for name in channels + links]
    for name in channels:
        paths += [Path("/dev/shm") / config.channel(name), Path("/dev/shm") / (config.channel(name) + GUARD_SUFFIX)]
    return paths


def claim_deployment(config: DetectorConfig) -> socket.socket:
    """This process's claim on the detector's deployment: an abstract unix socket named after it,
    which one process at a time can bind and which goes when that process ends, however it ends.
    UsageError if another `stddaq up` holds it. Two started together both passed
    ``check_not_running`` (no service listened yet); the one that lost crash-looped, and at its
    end removed the other's ring buffer and sockets as leftovers while that one ran on."""
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        claim.bind(f"\0stddaq-up-{config.detector_name}")
    except OSError:
        claim.close()
        raise UsageError(f"a deployment of {config.detector_name} is already running: another `stddaq up` of it "
                         "holds its claim (stop it first, or give this one another detector_name)") from None
    return claim


def config_snapshot(text: str, path: Path) -> tuple[int, dict[str, str]]:
    """A file descriptor holding ``text`` (the config file ``path`` as ``up`` read it) and the
    environment that makes the services read it instead of the file (``services.base.load_config``):
    a service restarted after a crash runs what the others run, whatever was edited in the file
    since (for the next run). In memory: nothing is left on disk, even after a SIGKILL."""
    fd = os.memfd_create("stddaq-config")  # close-on-exec; Popen's pass_fds hands it on (a name of
    # the file's own would have to be cut: memfd names end at 249 bytes, file names at 255)
    os.write(fd, text.encode("utf-8"))
    return fd, {CONFIG_SNAPSHOT_ENV: f"{fd}:{path}"}


def check_buffers_fit(config: DetectorConfig) -> None:
    """ConfigError if /dev/shm cannot hold the ring buffers of all the deployment's channels,
    before anything starts: otherwise the stages (or, for an image too big for memory, the
    simulator and the monitor, by MemoryError) failed one by one after the others started. A
    buffer of this detector left by a crashed deployment is replaced: the pages it holds count as
    free (not its size: a ring never fully written holds fewer)."""
    channels = [config.channel(name) for name in deployment_channels(config)]
    what = (f"the RAM buffer /dev/shm/{channels[0]}" if len(channels) == 1 else
            f"the {len(channels)} RAM buffers /dev/shm/{{{','.join(channels)}}}")
    hint = None
    if config.ram_buffer_slots is not None:  # ram_buffer_gb does not count then
        hint = "lower ram_buffer_slots, make the images smaller, or free /dev/shm"
    elif config.n_slots == MIN_SLOTS:  # ram_buffer_gb gives no fewer slots
        hint = (f"ram_buffer_gb gives at least {MIN_SLOTS} slots: set ram_buffer_slots lower, make the images "
                "smaller, or free /dev/shm")
    check_shm_room(config.buffer_n_bytes * len(channels), f"{what} ({config.n_slots} slots of "
                   f"{config.image_n_bytes} bytes each)", sum(shm_allocated(channel) for channel in channels), hint)


def check_not_running(config: DetectorConfig) -> None:
    """UsageError if a service of this detector already listens on one of the deployment's ipc
    sockets: a second deployment would take their names over and cut the first one's services
    off from each other for good."""
    for path in deployment_paths(config):
        if str(path).startswith("/tmp/") and ipc_in_use(str(path)):
            raise UsageError(f"a deployment of {config.detector_name} is already running: {path} is in use (stop it "
                             "first, or give this one another detector_name)")


def up(config_path: str | None, duration: float | None = None, driver_port: int = DRIVER_PORT) -> int:
    """Entry of `stddaq up`: with no path, the built-in demo configuration."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    demo = config_path is None
    with tempfile.TemporaryDirectory(prefix="stddaq-up-") if demo else contextlib.nullcontext() as tmp:
        if demo:  # only the demo needs a directory (for its config): a SIGKILLed supervisor leaves it
            path = Path(tmp) / "demo.json"
            path.write_text(demo_config_text(), encoding="utf-8")
            log.info("no config given: running the built-in demo (%s)", path)
        else:
            path = Path(config_path)
        text = read_config_text(path)
        config = DetectorConfig.loads(text, source=str(path))
        claim = claim_deployment(config)
        snapshot = None
        try:
            snapshot, env = config_snapshot(text, path)
            check_not_running(config)  # before the ports: a running deployment holds them (named so first)
            check_ports_free(listening_ports(config, driver_port))
            check_buffers_fit(config)
            supervisor = Supervisor(plan(config, path, demo=demo, driver_port=driver_port),
                                    leftovers=deployment_paths(config), env=env, pass_fds=(snapshot,))
            if not demo:
                log.info("the services run %s as it is now: an edit takes effect at the next `stddaq up`", path)

            def _on_signal(signum: int, _frame: object) -> None:
                supervisor.stop()

            previous = handle_stop_signals(_on_signal)
            try:
                return supervisor.run(duration)
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)
        finally:
            if snapshot is not None:
                os.close(snapshot)
            claim.close()
