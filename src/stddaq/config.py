"""DetectorConfig: the one validated description of a deployment (SPEC section 1).

Every service gets this object, built once at start; none reads the file or the environment on
its own. A bad file is rejected here, before any shared memory or socket exists, with one line
that names the file, the key, the value and what is allowed.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from stddaq.errors import ConfigError
from stddaq.formats import check_block_bytes, check_stream_address

log = logging.getLogger(__name__)

GIB = 1 << 30
SHM_ALIGNMENT = 2 * 1024 * 1024
MIN_SLOTS = 1000
DETECTOR_TYPES = ("gigafrost", "eiger", "pco", "jungfrau-raw", "jungfrau-converted")
LOG_LEVELS = ("debug", "info", "warning", "error", "off")
NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
#: the bus channel (suffix) each compression stage writes
STAGE_SUFFIXES = {"blosc2": "blosc2", "h5bitshuffle_lz4": "h5bitshuffle-lz4"}

StrictPositiveInt = Annotated[int, Field(strict=True, gt=0)]
StrictNonNegativeInt = Annotated[int, Field(strict=True, ge=0)]
PositiveNumber = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]
#: a unix socket path (the ipc address without ``ipc://``) has at most 107 bytes
MAX_IPC_PATH = 107
#: the longest ipc socket path of the standard channels is /tmp/<name>-h5bitshuffle-lz4
MAX_NAME_LENGTH = MAX_IPC_PATH - len("/tmp/") - len("-h5bitshuffle-lz4")


class LiveStreamConfig(BaseModel):
    """One entry of ``live_stream_configs``: how the stream at an address selects images."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["forward", "periodic", "batch"]
    config: tuple[StrictPositiveInt, StrictPositiveInt] | None = None

    @model_validator(mode="after")
    def _check(self) -> LiveStreamConfig:
        if self.type == "forward":
            return self
        if self.config is None:
            raise ValueError(f"type {self.type!r} needs \"config\": [Y, N] (two integers > 0)")
        y, n = self.config
        if self.type == "batch" and y > n:
            raise ValueError(f"batch [Y, N] = [{y}, {n}] sends Y of every N images, so Y must be <= N")
        return self


class CompressionStageConfig(BaseModel):
    """One entry of ``compression_stages`` (beyond upstream): a stage `stddaq up` starts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threads: StrictPositiveInt = 1
    level: Annotated[int, Field(strict=True, ge=1, le=9)] = 5  # blosc2 only
    block_size: StrictNonNegativeInt = 0  # h5bitshuffle_lz4 only: bytes, 0 = 8192


class DetectorConfig(BaseModel):
    """A deployment's detector config; unknown keys are kept for other services."""

    model_config = ConfigDict(extra="allow", frozen=True)

    detector_name: Annotated[str, Field(strict=True, pattern=NAME_PATTERN, max_length=MAX_NAME_LENGTH)]
    detector_type: Literal["gigafrost", "eiger", "pco", "jungfrau-raw", "jungfrau-converted"]
    image_pixel_height: StrictPositiveInt
    image_pixel_width: StrictPositiveInt
    bit_depth: Literal[8, 16, 32]
    # Upstream requires these for acquisition, which is out of scope here: validated if given.
    n_modules: StrictPositiveInt = 1
    start_udp_port: Annotated[int, Field(strict=True, ge=0, le=65535)] = 0
    module_positions: dict[str, tuple[int, int, int, int]] = Field(default_factory=dict)
    log_level: Literal["debug", "info", "warning", "error", "off"] = "info"
    stats_collection_period: PositiveNumber = 10.0
    ram_buffer_gb: Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)] = 0.0
    gpfs_block_size: StrictPositiveInt = 16 * 1024 * 1024
    number_of_writers: StrictNonNegativeInt = 0
    live_stream_configs: dict[str, LiveStreamConfig] = Field(default_factory=dict)
    switch_user_active: Annotated[bool, Field(strict=True)] = False
    # Accepted for compatibility with upstream configs, unused here.
    writer_user_id: StrictNonNegativeInt | None = None
    module_sync_queue_size: StrictPositiveInt | None = None
    max_number_of_forwarders_spawned: StrictNonNegativeInt | None = None
    use_all_forwarders: Annotated[bool, Field(strict=True)] | None = None
    sender_sends_full_images: Annotated[bool, Field(strict=True)] | None = None
    delay_filter_timeout: Annotated[float, Field(ge=0)] | None = None
    submodule_info: dict[str, Any] | list[Any] | None = None
    # Beyond upstream: an explicit slot count, for small test rings and small machines. A C++
    # reader does not know this key and computes n_slots from ram_buffer_gb.
    ram_buffer_slots: StrictPositiveInt | None = None
    # Beyond upstream: compression stages `stddaq up` starts, e.g. {"blosc2": {"threads": 2}}.
    compression_stages: dict[Literal["blosc2", "h5bitshuffle_lz4"], CompressionStageConfig] = Field(
        default_factory=dict)

    @field_validator("ram_buffer_gb")
    @classmethod
    def _whole_gib(cls, value: float) -> float:
        if value != int(value):
            log.warning("ram_buffer_gb %s counts as %d: the C++ services read it as a whole number of GiB, and "
                        "every service of a channel must find the same slots", value, int(value))
        return value

    @field_validator("compression_stages")
    @classmethod
    def _check_block_size(cls, value: dict[str, CompressionStageConfig], info: ValidationInfo) -> dict:
        stage = value.get("h5bitshuffle_lz4")
        if stage is None or "bit_depth" not in info.data or "detector_type" not in info.data:
            return value
        itemsize = 4 if info.data["detector_type"] == "jungfrau-converted" else info.data["bit_depth"] // 8
        try:
            check_block_bytes(stage.block_size, itemsize)
        except ValueError as exc:
            raise ValueError(f"h5bitshuffle_lz4 {exc}") from None
        return value

    @field_validator("live_stream_configs")
    @classmethod
    def _check_stream_addresses(cls, value: dict[str, LiveStreamConfig]) -> dict:
        for address in value:
            check_stream_address(address)
        return value

    @field_validator("bit_depth")
    @classmethod
    def _check_bit_depth_fits_the_slot(cls, value: int, info: ValidationInfo) -> int:
        if info.data.get("detector_type") == "gigafrost" and value > 16:  # SPEC: its slots hold 2 bytes a pixel
            raise ValueError(f"bit_depth {value} does not fit a gigafrost image slot, which holds 2 bytes per pixel")
        return value

    @field_validator("module_positions")
    @classmethod
    def _check_module_positions(cls, value: dict[str, tuple[int, int, int, int]]) -> dict:
        for module_id, (x0, y0, x1, y1) in value.items():
            if min(x0, y0, x1, y1) < 0:
                raise ValueError(f"module {module_id!r} has a negative corner {[x0, y0, x1, y1]}")
        return value

    # ----------------------------------------------------------------- derived values
    @property
    def dtype(self) -> np.dtype:
        """The pixel type of assembled images (little endian)."""
        if self.detector_type == "jungfrau-converted":
            return np.dtype("<f4")
        return np.dtype({8: "<u1", 16: "<u2", 32: "<u4"}[self.bit_depth])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.image_pixel_height, self.image_pixel_width)

    @property
    def image_n_bytes(self) -> int:
        """Bytes of one image slot, as upstream sizes it."""
        pixels = self.image_pixel_height * self.image_pixel_width
        if self.detector_type == "jungfrau-converted":
            return pixels * 4
        if self.detector_type == "gigafrost":
            return pixels * 2
        return pixels * self.bit_depth // 8

    @property
    def n_slots(self) -> int:
        if self.ram_buffer_slots is not None:
            return self.ram_buffer_slots
        # whole GiB: the C++ services read ram_buffer_gb as an integer (2.5 is 2), and every service
        # of a channel must find the same slots, or each reads the others' images at wrong offsets
        return max(MIN_SLOTS, int(self.ram_buffer_gb) * GIB // self.image_n_bytes)

    @property
    def buffer_n_bytes(self) -> int:
        """Size of the shm object: n_slots * slot size, rounded up to 2 MiB."""
        return math.ceil(self.n_slots * self.image_n_bytes / SHM_ALIGNMENT) * SHM_ALIGNMENT

    @property
    def python_log_level(self) -> int:
        return {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
                "error": logging.ERROR, "off": logging.CRITICAL + 10}[self.log_level]

    def channel(self, suffix: str) -> str:
        """Name of a bus channel: the shm object and the ipc socket file share it."""
        if not re.fullmatch(NAME_PATTERN, suffix):
            raise ConfigError(f"channel suffix {suffix!r} is not allowed: use letters, digits, '_', '.', '-'")
        channel = f"{self.detector_name}-{suffix}"
        if len(f"/tmp/{channel}".encode()) > MAX_IPC_PATH:
            raise ConfigError(f"channel suffix {suffix!r} is too long: its socket path /tmp/{channel} would have "
                              f"{len(f'/tmp/{channel}'.encode())} bytes, a unix socket path at most {MAX_IPC_PATH}")
        return channel

    def ipc_address(self, suffix: str) -> str:
        return f"ipc:///tmp/{self.channel(suffix)}"

    def derived(self) -> dict[str, Any]:
        """The values services compute from the file, for `stddaq config check`."""
        return {
            "detector_name": self.detector_name,
            "detector_type": self.detector_type,
            "shape": list(self.shape),
            "dtype": str(self.dtype),
            "image_n_bytes": self.image_n_bytes,
            "n_slots": self.n_slots,
            "buffer_n_bytes": self.buffer_n_bytes,
            "image_channel": self.channel("image"),
            "image_metadata_address": self.ipc_address("image"),
            "image_buffer_path": f"/dev/shm/{self.channel('image')}",
            "number_of_writers": self.number_of_writers,
            "live_streams": {k: v.model_dump() for k, v in self.live_stream_configs.items()},
        }

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-able dict, unknown keys included."""
        return self.model_dump(mode="json", exclude_none=True)

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_dict(cls, data: Any, source: str = "<config>") -> DetectorConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the config must be a JSON object, got {type(data).__name__}")
        try:
            config = cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_describe(source, exc)) from None
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            log.debug("%s: keys not used by stddaq kept as they are: %s", source, ", ".join(unknown))
        return config

    @classmethod
    def load(cls, path: str | Path) -> DetectorConfig:
        return cls.loads(read_config_text(path), source=str(path))

    @classmethod
    def loads(cls, text: str, source: str = "<config>") -> DetectorConfig:
        """The config in ``text`` (JSON), read from ``source`` (named in the errors)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
        return cls.from_dict(data, source=source)


def read_config_text(path: str | Path) -> str:
    """The text of a config file; ConfigError saying why it cannot be read."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a JSON config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None


def _describe(source: str, exc: ValidationError) -> str:
    """One line per problem (the first first), naming key, value and what is allowed."""
    lines = []
    for err in exc.errors(include_url=False):
        key = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "tuple[")))
        if err["type"] == "missing":
            lines.append(f"{source}: required key {key!r} is missing")
            continue
        allowed = _ALLOWED.get(str(err["loc"][0]) if err["loc"] else "", "")
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: key {key!r} has value {err['input']!r}: {msg}" + (f" (allowed: {allowed})" if allowed else ""))
    return "; ".join(lines)


_ALLOWED = {
    "detector_name": f"letters, digits, '_', '.', '-' (pattern {NAME_PATTERN}), at most {MAX_NAME_LENGTH} "
                     "characters (the ipc socket paths made of it)",
    "detector_type": ", ".join(DETECTOR_TYPES),
    "bit_depth": "8, 16, 32; gigafrost 8, 16",
    "image_pixel_height": "an integer > 0",
    "image_pixel_width": "an integer > 0",
    "log_level": ", ".join(LOG_LEVELS),
    "live_stream_configs": '{"tcp://host:port": {"type": "forward"} or {"type": "periodic"|"batch", "config": [Y, N]}}',
    "module_positions": '{"module_id": [x0, y0, x1, y1]}',
    "compression_stages": '{"blosc2": {"threads": N, "level": 1..9}, "h5bitshuffle_lz4": {"threads": N, '
                          '"block_size": bytes, 0 or a multiple of 8 x bytes per pixel}}',
}
