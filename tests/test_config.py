"""DetectorConfig: validation errors (one line naming file, key, value, allowed) and derived sizes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import base_config

from stddaq.config import DetectorConfig
from stddaq.errors import ConfigError

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.json"))

BAD = [
    # (what to change, substrings the error must contain)
    ({"bit_depth": 12}, ["bit_depth", "12", "8, 16, 32"]),
    ({"image_pixel_height": -5}, ["image_pixel_height", "-5", "> 0"]),
    ({"image_pixel_width": 0}, ["image_pixel_width", "0", "> 0"]),
    ({"image_pixel_width": "128"}, ["image_pixel_width", "'128'", "integer"]),
    ({"image_pixel_width": 12.5}, ["image_pixel_width", "12.5"]),
    ({"detector_type": "medipix"}, ["detector_type", "medipix", "gigafrost", "jungfrau-converted"]),
    ({"detector_name": "my det"}, ["detector_name", "my det", "letters, digits"]),
    ({"detector_name": "../etc"}, ["detector_name", "../etc"]),
    ({"log_level": "verbose"}, ["log_level", "verbose", "debug, info"]),
    ({"stats_collection_period": 0}, ["stats_collection_period", "0"]),
    ({"ram_buffer_gb": -1}, ["ram_buffer_gb", "-1"]),
    ({"number_of_writers": -2}, ["number_of_writers", "-2"]),
    ({"switch_user_active": "yes"}, ["switch_user_active", "yes"]),
    ({"start_udp_port": 70000}, ["start_udp_port", "70000"]),
    ({"module_positions": {"0": [0, 1, 2]}}, ["module_positions", "0"]),
    ({"live_stream_configs": {"tcp://a:1": {"type": "burst"}}}, ["live_stream_configs", "burst", "forward"]),
    ({"live_stream_configs": {"tcp://a:1": {"type": "batch", "config": [5, 2]}}}, ["live_stream_configs", "Y must be <= N"]),
    ({"live_stream_configs": {"tcp://a:1": {"type": "periodic"}}}, ["live_stream_configs", "config"]),
    # found by review: each passed here and failed later, in a service
    ({"live_stream_configs": {"foo": {"type": "forward"}}}, ["live_stream_configs", "'foo'", "tcp://HOST:PORT"]),
    ({"live_stream_configs": {"tcp://a:70000": {"type": "forward"}}}, ["live_stream_configs", "PORT 0..65535"]),
    ({"bit_depth": 32}, ["bit_depth", "32", "gigafrost image slot, which holds 2 bytes per pixel"]),
    ({"ram_buffer_gb": float("inf")}, ["ram_buffer_gb", "inf", "finite"]),
    ({"stats_collection_period": float("inf")}, ["stats_collection_period", "finite"]),
    ({"stats_collection_period": "5"}, ["stats_collection_period", "'5'"]),
    ({"detector_name": "d" * 86}, ["detector_name", "at most 85 characters"]),
]


@pytest.mark.parametrize("change,expected", BAD, ids=[next(iter(c)) + "-" + str(i) for i, (c, _) in enumerate(BAD)])
def test_bad_value_is_named(tmp_path: Path, change: dict, expected: list[str]) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(base_config(**change)))
    with pytest.raises(ConfigError) as info:
        DetectorConfig.load(path)
    message = str(info.value)
    assert str(path) in message
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"
    assert "\n" not in message


@pytest.mark.parametrize("key", ["detector_name", "detector_type", "image_pixel_height", "image_pixel_width", "bit_depth"])
def test_missing_key_is_named(tmp_path: Path, key: str) -> None:
    data = base_config()
    del data[key]
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=f"required key '{key}' is missing"):
        DetectorConfig.load(path)


def test_missing_file_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        DetectorConfig.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"detector_name": "x",\n "bit_depth": }')
    with pytest.raises(ConfigError, match=r"invalid JSON at line 2 column"):
        DetectorConfig.load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be a JSON object, got list"):
        DetectorConfig.load(bad)
    with pytest.raises(ConfigError, match="is a directory"):
        DetectorConfig.load(tmp_path)


@pytest.mark.parametrize("kind,bits,dtype,n_bytes", [
    ("gigafrost", 16, "uint16", 480 * 128 * 2),
    ("gigafrost", 8, "uint8", 480 * 128 * 2),  # upstream sizes gigafrost slots as 16 bit always
    ("eiger", 32, "uint32", 480 * 128 * 4),
    ("eiger", 8, "uint8", 480 * 128),
    ("jungfrau-raw", 16, "uint16", 480 * 128 * 2),
    ("jungfrau-converted", 16, "float32", 480 * 128 * 4),
    ("pco", 16, "uint16", 480 * 128 * 2),
])
def test_derived_sizes(kind: str, bits: int, dtype: str, n_bytes: int) -> None:
    config = DetectorConfig.from_dict(base_config(detector_type=kind, bit_depth=bits, image_pixel_height=480,
                                                  image_pixel_width=128, ram_buffer_slots=None))
    assert config.dtype == np.dtype(dtype)
    assert config.image_n_bytes == n_bytes
    assert config.n_slots == 1000
    assert config.buffer_n_bytes % (2 * 1024 * 1024) == 0
    assert 0 <= config.buffer_n_bytes - 1000 * n_bytes < 2 * 1024 * 1024


def test_n_slots_from_ram_buffer_gb() -> None:
    config = DetectorConfig.from_dict(base_config(image_pixel_height=2016, image_pixel_width=2016, ram_buffer_gb=16,
                                                  ram_buffer_slots=None))
    assert config.n_slots == (16 << 30) // (2016 * 2016 * 2) == 2113
    small = DetectorConfig.from_dict(base_config(ram_buffer_gb=0.001, ram_buffer_slots=None))
    assert small.n_slots == 1000  # never fewer than 1000 (upstream)


def test_a_fractional_ram_buffer_gb_counts_whole_gib_as_upstream_reads_it(caplog) -> None:
    """The C++ services read ram_buffer_gb as an integer: with 2.5 they found 17476 slots of a
    480x128 image and we 21845, so each read the other's images at wrong offsets."""
    with caplog.at_level(logging.WARNING):
        config = DetectorConfig.from_dict(base_config(image_pixel_height=480, image_pixel_width=128,
                                                      ram_buffer_gb=2.5, ram_buffer_slots=None))
    assert config.n_slots == (2 << 30) // (480 * 128 * 2) == 17476
    assert "ram_buffer_gb 2.5 counts as 2: the C++ services read it as a whole number of GiB" in caplog.text


def test_channel_names_and_unknown_keys_kept() -> None:
    config = DetectorConfig.from_dict(base_config(detector_name="GF2", future_key={"a": 1}))
    assert config.channel("image") == "GF2-image"
    assert config.ipc_address("blosc2") == "ipc:///tmp/GF2-blosc2"
    assert config.to_dict()["future_key"] == {"a": 1}
    with pytest.raises(ConfigError, match="suffix"):
        config.channel("a/b")
    longest = "s" * (107 - len("/tmp/GF2-"))
    assert len(config.ipc_address(longest)) == len("ipc://") + 107
    with pytest.raises(ConfigError, match=r"too long: its socket path /tmp/GF2-s+ would have 108 bytes"):
        config.channel(longest + "s")


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_are_valid(path: Path) -> None:
    DetectorConfig.load(path)


def test_cli_check_prints_derived_values_or_one_line(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(base_config(detector_name="clicheck")))
    out = subprocess.run([sys.executable, "-m", "stddaq.cli", "config", "check", str(good)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    derived = json.loads(out.stdout)
    assert derived["image_n_bytes"] == 48 * 32 * 2 and derived["image_channel"] == "clicheck-image"

    bad = tmp_path / "bad.json"
    name = "cfgbad" + os.urandom(4).hex()
    bad.write_text(json.dumps(base_config(detector_name=name, bit_depth=12)))
    for argv in (["stddaq.cli", "config", "check", str(bad)], ["stddaq.services.simulator", str(bad)]):
        out = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=30)
        assert out.returncode == 2
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "bit_depth" in lines[0] and "12" in lines[0] and str(bad) in lines[0]
        assert not [e for e in os.listdir("/dev/shm") + os.listdir("/tmp") if e.startswith(name)]
