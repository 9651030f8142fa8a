"""The driver's pure pieces: command parsing, status messages, pre-flight, the record_image framing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stddaq.protocol import ImageMetadata, WriterAction
from stddaq.services.driver import record_image_bytes
from stddaq.services.driver_control import (
    DEFAULT_N_IMAGE,
    CommandError,
    PreflightError,
    StartCommand,
    Status,
    StopCommand,
    parse_command,
    preflight,
    status_message,
    writable_by,
)


def test_start_with_only_path_gets_the_upstream_defaults() -> None:
    command = parse_command('{"command": "start", "path": "/data/run1"}')
    assert command == StartCommand(path="/data/run1", file_prefix="file", n_image=DEFAULT_N_IMAGE, writer_id=0,
                                   start_id=0, n_image_given=False)
    assert command.raw_file(2) == Path("/data/run1/file2.h5")
    assert command.meta_file == Path("/data/run1/fileMeta.h5")
    assert command.master_file == Path("/data/run1/file_master.h5")


@pytest.mark.parametrize("extra", ["start_time", "start_ts", "image", "writer", "comment", "file_prefx"])
def test_other_fields_are_ignored_as_upstream_does(extra: str) -> None:
    """Only a start field misspelt is refused; the first rule (close in spelling) refused
    reasonable extra fields a client may send (start_time: "did you mean 'start_id'?")."""
    command = parse_command(json.dumps({"command": "start", "path": "/d", extra: 1}))
    assert command.path == "/d" and command.start_id == 0


def test_a_misspelt_field_beside_the_right_one_is_ignored() -> None:
    assert parse_command(json.dumps({"command": "start", "path": "/d", "paths": ["/d"]})).path == "/d"


def test_start_with_every_field_and_stop() -> None:
    command = parse_command(json.dumps({"command": "start", "path": "/d", "file_prefix": "scan.", "n_image": 5,
                                        "writer_id": 1000, "start_id": 77, "extra": "ignored"}))
    assert (command.file_prefix, command.n_image, command.writer_id, command.start_id, command.n_image_given) == \
        ("scan.", 5, 1000, 77, True)
    assert parse_command(b'{"command": "stop"}') == StopCommand()


@pytest.mark.parametrize("text,words", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"path": "/d"}', 'no "command"'),
    ('{"command": "begin"}', "unknown command 'begin'"),
    ('{"command": "start"}', 'needs "path"'),
    ('{"command": "start", "path": ""}', '"path" must be a non-empty string'),
    ('{"command": "start", "path": 3}', '"path" must be a non-empty string'),
    ('{"command": "start", "path": "/d", "file_prefix": "a/b"}', "without '/'"),
    ('{"command": "start", "path": "/d", "n_image": 0}', "'n_image' is 0"),
    ('{"command": "start", "path": "/d", "n_image": -5}', "'n_image' is -5"),
    ('{"command": "start", "path": "/d", "n_image": 1.5}', "'n_image' must be an integer"),
    ('{"command": "start", "path": "/d", "n_image": "10"}', "'n_image' must be an integer"),
    ('{"command": "start", "path": "/d", "n_image": true}', "'n_image' must be an integer"),
    ('{"command": "start", "path": "/d", "start_id": -1}', "'start_id' is -1"),
    ('{"command": "start", "path": "/d", "writer_id": "root"}', "'writer_id' must be an integer"),
    # a misspelt field would leave its default (n_image: record until stop): refused, the right name said
    ('{"command": "start", "path": "/d", "n_images": 10}', "unknown field 'n_images': did you mean 'n_image'?"),
    ('{"command": "start", "path": "/d", "startid": 5}', "unknown field 'startid': did you mean 'start_id'?"),
    ('{"command": "start", "path": "/d", "N-Image": 3}', "did you mean 'n_image'?"),
    # what json cannot parse within Python's limits is bad JSON too (it ended the client's connection)
    pytest.param("[" * 100_000, "nested too deeply", id="deep-nesting"),
    pytest.param('{"command": "start", "path": "/d", "n_image": ' + "9" * 5000 + "}", "not valid JSON",
                 id="5000-digit-integer"),
])
def test_bad_commands_say_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(CommandError, match=words.replace("(", r"\(")) as info:
        parse_command(text)
    assert "\n" not in str(info.value)


def test_status_messages_follow_spec_8() -> None:
    assert status_message(Status.idle) == {"status": "idle"}
    assert status_message(Status.recording, count=12) == {"status": "recording", "count": 12}
    assert status_message(Status.saving_file, count=3) == {"status": "saving_file", "count": 3}
    assert status_message(Status.file_saved, count=3) == {"status": "file_saved"}
    assert status_message(Status.error, reason="disk full") == {"status": "error", "reason": "disk full"}
    assert set(Status) == {"idle", "creating_file", "waiting_for_first_image", "recording", "saving_file",
                           "file_saved", "stop", "error"}


def _start(path: Path, **kw) -> StartCommand:
    return StartCommand(path=str(path), **kw)


def test_preflight_accepts_a_writable_directory_and_says_how_much_fits(tmp_path: Path) -> None:
    check = preflight(_start(tmp_path), recording_bytes=lambda n: n * 1000, files=[tmp_path / "file0.h5"],
                      switch_user=False)
    assert check.free_bytes > 0 and check.images_that_fit == check.free_bytes // 1000


@pytest.mark.parametrize("case,words", [
    ("missing", "does not exist"),
    ("file", "is not a directory"),
    ("relative", "must be absolute"),
    ("exists", "already exists"),
    ("no room", "not enough space"),
    ("name too long", "File name too long"),
])
def test_preflight_refuses(tmp_path: Path, case: str, words: str) -> None:
    target = tmp_path / "run"
    target.mkdir()
    kw: dict = {}
    if case == "missing":
        target = tmp_path / "nope"
    elif case == "file":
        target = tmp_path / "a-file"
        target.write_text("x")
    elif case == "relative":
        target = Path("relative/dir")
    elif case == "exists":
        (target / "file0.h5").write_text("old data")
    elif case == "no room":
        kw = {"n_image": 10, "n_image_given": True}
    image_n_bytes = 1 << 60 if case == "no room" else 100

    def recording_bytes(n: int) -> int:
        return n * image_n_bytes
    file = target / ("x" * 300 + ".h5" if case == "name too long" else "file0.h5")  # a file_prefix too long
    with pytest.raises(PreflightError, match=words):
        preflight(_start(target, **kw), recording_bytes=recording_bytes, files=[file], switch_user=False)


def test_default_n_image_is_not_refused_for_space(tmp_path: Path) -> None:
    check = preflight(_start(tmp_path), recording_bytes=lambda n: n << 40, files=[], switch_user=False)
    assert check.images_that_fit < DEFAULT_N_IMAGE


def test_preflight_checks_the_writer_uid_when_switching_user(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    nobody = 65534
    with pytest.raises(PreflightError, match="not writable by user id 65534"):
        preflight(_start(tmp_path, writer_id=nobody), recording_bytes=lambda n: n * 10, files=[], switch_user=True)
    assert preflight(_start(tmp_path, writer_id=0), recording_bytes=lambda n: n * 10, files=[], switch_user=True)
    os.chmod(tmp_path, 0o777)
    assert writable_by(tmp_path, nobody)
    os.chmod(tmp_path, 0o775)
    assert not writable_by(tmp_path, nobody)
    os.chown(tmp_path, nobody, -1)
    os.chmod(tmp_path, 0o700)
    assert writable_by(tmp_path, nobody)
    os.chmod(tmp_path, 0o500)
    assert not writable_by(tmp_path, nobody)


@pytest.mark.parametrize("image_id,name_len,run", [(0, 0, None), (2**40, 5, 1), (123, 300, 2**40), (7, 0, 0)])
def test_record_image_bytes_equal_protobuf(image_id: int, name_len: int, run: int | None) -> None:
    metadata = ImageMetadata(image_id=image_id, height=48, width=32, size=3072, dtype=2, status=1)
    if name_len:
        metadata.pco.bsread_name = "x" * name_len
    action = WriterAction()
    action.record_image.image_metadata.CopyFrom(metadata)
    action.record_image.run = run or 0
    assert record_image_bytes(metadata.SerializeToString(), run) == action.SerializeToString()
    parsed = WriterAction.FromString(record_image_bytes(metadata.SerializeToString(), run))
    assert parsed.record_image.image_metadata == metadata and parsed.record_image.run == (run or 0)


def test_plan_starts_writers_metadata_writer_and_driver(make_config) -> None:
    from stddaq.deploy import DRIVER_PORT, plan

    config, path = make_config(number_of_writers=2)
    specs = {spec.name: spec.argv for spec in plan(config, path)}
    assert specs["std_det_writer-0"][-3:] == ["stddaq.services.writer", str(path), "0"]
    assert specs["std_det_writer-1"][-3:] == ["stddaq.services.writer", str(path), "1"]
    assert specs["std_det_writer-meta"][-3:] == ["stddaq.services.writer", str(path), "meta"]
    assert specs["std_det_driver"][-5:] == ["stddaq.services.driver", str(path), "-m", "-p", str(DRIVER_PORT)]
    names = list(specs)
    assert names.index("std_det_driver") > max(names.index(n) for n in names if n.startswith("std_det_writer"))
    config, path = make_config(number_of_writers=0)
    assert not [name for name in (spec.name for spec in plan(config, path)) if name.startswith("std_det")]


def test_images_that_fit_is_the_most_whose_recording_fits() -> None:
    from stddaq.services.driver_control import images_that_fit

    def recording_bytes(n: int) -> int:  # fixed files, whole chunks of 4 images, rows
        return 0 if n == 0 else 1000 + -(-n // 4) * 4 * 7 + n * 3

    for free in [*range(0, 1200), 10**6, 10**9]:
        fit = images_that_fit(recording_bytes, free)
        assert recording_bytes(fit) <= free < recording_bytes(fit + 1), (free, fit)
    assert images_that_fit(lambda n: n, 1 << 70) == 1 << 62  # a bound that never fills: the search ends
