"""RamBuffer: layout (offsets, 2 MiB rounding), ownership, attach errors, and the overwrite guard."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import unique_name

from stddaq.bus.ram_buffer import GUARD_SUFFIX, BufferLayout, RamBuffer
from stddaq.errors import BufferLayoutError, BufferMissingError, BusError, ConfigError


def test_layout_offsets_and_size() -> None:
    layout = BufferLayout("x-image", slot_n_bytes=122880, n_slots=1000)
    assert layout.offset(0) == 0
    assert layout.offset(1) == 122880
    assert layout.offset(1000) == 0
    assert layout.offset(1234) == 234 * 122880
    assert layout.n_bytes == 59 * 2 * 1024 * 1024 and layout.n_bytes >= 122880 * 1000


def test_create_write_attach_read_unlink() -> None:
    name = unique_name() + "-image"
    layout = BufferLayout(name, slot_n_bytes=64, n_slots=4)
    with RamBuffer.create(layout) as owner:
        assert os.path.exists(f"/dev/shm/{name}") and os.path.exists(f"/dev/shm/{name}{GUARD_SUFFIX}")
        assert os.stat(f"/dev/shm/{name}").st_size == 2 * 1024 * 1024
        owner.begin_write(6)
        owner.slot_array(6, (4, 8), np.uint16)[:] = np.arange(32).reshape(4, 8)
        owner.end_write(6)
        with RamBuffer.attach(layout) as reader:
            view = reader.slot_array(6, (4, 8), np.uint16)
            assert np.array_equal(view, np.arange(32).reshape(4, 8))
            # the bytes are at (6 % 4) * 64 in the object, as a C++ reader expects
            with open(f"/dev/shm/{name}", "rb") as raw:
                raw.seek(2 * 64)
                assert np.frombuffer(raw.read(64), np.uint16).tolist() == list(range(32))
            assert reader.holds(6) and not reader.holds(2) and not reader.holds(10)
            for image_id in (0, 3, 6, 11):  # the address C calls get is the slot view's
                assert reader.slot_address(image_id) == reader.slot_array(image_id, (4, 8), np.uint16).ctypes.data
            with pytest.raises(ValueError):
                view[0, 0] = 1  # readers map read-only
            del view
    assert not os.path.exists(f"/dev/shm/{name}") and not os.path.exists(f"/dev/shm/{name}{GUARD_SUFFIX}")


def test_a_view_kept_after_close_stays_readable() -> None:
    """Closing a buffer while a consumer still holds an image's view keeps the mapping until the
    view is gone. It used to unmap at once, and the next read of the view (pytest printing a
    failed test's arguments, in CI) killed the process with SIGSEGV: hence a child process."""
    name = unique_name() + "-image"
    script = f"""
import gc, numpy as np
from stddaq.bus.ram_buffer import BufferLayout, RamBuffer
layout = BufferLayout({name!r}, slot_n_bytes=4 << 20, n_slots=2)
owner = RamBuffer.create(layout)
owner.slot_array(1, (1024, 2048), np.uint16)[:] = 7
reader = RamBuffer.attach(layout)
kept = reader.slot_array(1, (1024, 2048), np.uint16)
whole = reader.slot_bytes(1)
reader.close()
owner.close()
gc.collect()
print(int(kept.max()), int(kept.sum()), int(whole[:8].sum()))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.split() == ["7", str(7 * 1024 * 2048), "28"]  # uint16 7: bytes 7, 0
    assert not os.path.exists(f"/dev/shm/{name}")


def test_guard_sees_write_in_progress_and_overwrite() -> None:
    layout = BufferLayout(unique_name() + "-image", slot_n_bytes=8, n_slots=2)
    with RamBuffer.create(layout) as owner, RamBuffer.attach(layout) as reader:
        owner.begin_write(3)
        assert not reader.holds(3)  # being written
        owner.end_write(3)
        assert reader.holds(3)
        owner.begin_write(5)  # same slot, newer image
        assert not reader.holds(3) and not reader.holds(5)
        owner.end_write(5)
        assert reader.holds(5) and not reader.holds(3)


def test_holds_a_run_reads_the_sequence_word_before_the_run_word() -> None:
    """Read run word first: a reader descheduled between its two loads took the run stamp of
    the image a ring later (same run), then found the sequence word of its id again, written by
    the next run: intact, with another image's pixels (review 23, forced with this hook)."""
    layout = BufferLayout(unique_name() + "-image", slot_n_bytes=8, n_slots=4)
    with RamBuffer.create(layout) as owner, RamBuffer.attach(layout) as reader:

        def write(image_id: int, run: int) -> None:
            owner.begin_write(image_id)
            owner.end_write(image_id)
            owner.stamp(image_id, run)

        write(3, 1)
        write(7, 1)  # a ring later, same run: the slot no longer holds image 3

        class Descheduled:  # after the reader's first load, the next run rewrites image 3
            def __init__(self, words) -> None:
                self.words = words

            def __getitem__(self, slot: int) -> int:
                value = self.words[slot]
                if not rewritten:
                    rewritten.append(True)
                    write(3, 2)
                return value

        rewritten: list[bool] = []
        words = reader._seq, reader._run_words
        reader._seq, reader._run_words = Descheduled(words[0]), Descheduled(words[1])
        try:
            assert not reader.holds(3, run=1)
        finally:
            reader._seq, reader._run_words = words
        assert rewritten and reader.holds(3, run=2) and not reader.holds(3, run=1)


def test_overtaken_within_says_when_the_writer_is_nearly_a_ring_ahead() -> None:
    layout = BufferLayout(unique_name() + "-image", slot_n_bytes=8, n_slots=8)
    with RamBuffer.create(layout) as owner, RamBuffer.attach(layout) as reader:
        for image_id in range(10, 15):
            owner.begin_write(image_id)
            owner.end_write(image_id)
        # the writer is at 14: image 10's slot is reused by 18, four images away
        assert not reader.overtaken_within(10, 3) and reader.overtaken_within(10, 4)
        owner.begin_write(15)  # begun is enough: the slot of 15 - 8 = 7 is being overwritten
        assert reader.overtaken_within(10, 3) and not reader.overtaken_within(10, 2)
        assert not reader.overtaken_within(14, 1)


def test_a_leftover_id_in_a_slot_the_new_run_skipped_is_no_writer_ahead() -> None:
    """Ids 100..119, then a new run 0, 1, 3..9 in the same buffer (id 2 never came): slot 2 still
    held 114, which passed for the writer being at 10, and image 3, intact and read in time,
    was given up (counted lost, the log blaming the reader's speed)."""
    layout = BufferLayout(unique_name("gap"), slot_n_bytes=64, n_slots=8)
    with RamBuffer.create(layout) as ring:
        for image_id in [*range(100, 120), 0, 1, *range(3, 10)]:
            ring.begin_write(image_id)
            ring.end_write(image_id)
        stale = 0 + 8 - 1  # what the subscriber passes after the ids went back to 0
        assert not ring.overtaken_within(3, 1, stale)  # slot 2 (id 10's) holds 114: no evidence
        assert ring.overtaken_within(3, 2, stale)  # slot 1 holds 9 = 3 + 8 - 2: the writer is there
        ring.begin_write(10)
        assert ring.overtaken_within(3, 1, stale)  # now it is at 10
    with RamBuffer.create(layout) as ring:
        for image_id in range(18):  # the writer two rings past image 1
            ring.begin_write(image_id)
            ring.end_write(image_id)
        assert ring.overtaken_within(1, 1)  # slot 0 holds 16, and image 1's own slot is gone


def test_a_buffer_larger_than_the_room_in_dev_shm_is_refused(monkeypatch) -> None:
    """It was made (ftruncate reserves nothing), and its writer died of SIGBUS, without a word,
    once /dev/shm was full: `stddaq up` restarted it again and again."""
    import stddaq.bus.ram_buffer as ram_buffer

    layout = BufferLayout(unique_name("room"), slot_n_bytes=1 << 20, n_slots=8)
    real = os.statvfs

    class Almost:  # what /dev/shm would say with 5 MiB free
        f_bavail, f_frsize = 5, 1 << 20

    monkeypatch.setattr(ram_buffer.os, "statvfs", lambda path: Almost() if path == "/dev/shm" else real(path))
    leftover = []
    try:
        with pytest.raises(ConfigError, match=rf"no room in /dev/shm for the RAM buffer /dev/shm/{layout.name}: "
                                              r"8.0 MiB needed, 5.0 MiB free \(lower ram_buffer_gb or ram_buffer_slots"):
            leftover.append(RamBuffer.create(layout))
    finally:  # made after all (this test failing): not left in /dev/shm
        for buffer in leftover:
            buffer.close()
    assert not os.path.exists(f"/dev/shm/{layout.name}") and not os.path.exists(f"/dev/shm/{layout.name}{GUARD_SUFFIX}")


def test_a_crashed_writers_buffer_counts_as_room_for_its_replacement(monkeypatch) -> None:
    """The room check saw a crashed writer's ring (its pages held while readers still map it) as
    taken: its restart was refused (exit 2), and `stddaq up` stopped the whole deployment."""
    import stddaq.bus.ram_buffer as ram_buffer

    name = unique_name("crash") + "-image"
    layout = BufferLayout(name, slot_n_bytes=1 << 20, n_slots=4)
    code = ("import os, signal\n"
            "import numpy as np\n"
            "from stddaq.bus.ram_buffer import BufferLayout, RamBuffer\n"
            f"b = RamBuffer.create(BufferLayout({name!r}, 1 << 20, 4))\n"
            "np.frombuffer(b.data, np.uint8)[:] = 1  # every slot written: its pages are held\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == -9
    real = os.statvfs

    class Once:  # room for one ring of 4 MiB, not two
        f_bavail, f_frsize = 3, 1 << 20

    monkeypatch.setattr(ram_buffer.os, "statvfs", lambda path: Once() if path == "/dev/shm" else real(path))
    with RamBuffer.create(layout) as replacement:
        assert replacement.owner
    assert not os.path.exists(f"/dev/shm/{name}")


def test_attach_missing_names_object_and_creator() -> None:
    layout = BufferLayout(unique_name() + "-image", slot_n_bytes=8, n_slots=2)
    with pytest.raises(BufferMissingError, match=rf"/dev/shm/{layout.name} does not exist: start std_sim"):
        RamBuffer.attach(layout, created_by="std_sim")


def test_attach_with_other_size_is_refused() -> None:
    name = unique_name() + "-image"
    with RamBuffer.create(BufferLayout(name, slot_n_bytes=1 << 20, n_slots=4)):
        with pytest.raises(BufferLayoutError, match=r"has 4194304 bytes but this config implies 2097152"):
            RamBuffer.attach(BufferLayout(name, slot_n_bytes=1 << 20, n_slots=2))


@pytest.mark.parametrize("theirs,message", [
    ((3008, 8), r"was made with 8 slots of 3008 bytes, this config implies 8 slots of 3072 bytes"),
    ((3072, 16), r"was not made with this config's 8 slots of 3072 bytes \(its overwrite guard has no layout"),
    ((3072, 4), r"its overwrite guard has no layout where this config expects it"),
])
def test_attach_with_another_layout_of_the_same_size_is_refused(theirs, message) -> None:
    """The object is a whole number of 2 MiB: 8 or 16 slots of 3 kB, or slots of 3008 and 3072
    bytes, are the same size. A reader with the other layout read every image at the wrong
    offset with the guard saying complete (a camera's ROI changed and one service kept its
    old config); the guard's layout record tells it."""
    name = unique_name() + "-image"
    slot_n_bytes, n_slots = theirs
    with RamBuffer.create(BufferLayout(name, slot_n_bytes=slot_n_bytes, n_slots=n_slots)):
        mine = BufferLayout(name, slot_n_bytes=3072, n_slots=8)
        assert os.stat(f"/dev/shm/{name}").st_size == mine.n_bytes  # the size alone cannot tell
        with pytest.raises(BufferLayoutError, match=message):
            RamBuffer.attach(mine)
    with RamBuffer.create(BufferLayout(name, slot_n_bytes=3072, n_slots=8)):
        RamBuffer.attach(BufferLayout(name, slot_n_bytes=3072, n_slots=8)).close()


def test_second_writer_is_refused() -> None:
    layout = BufferLayout(unique_name() + "-image", slot_n_bytes=8, n_slots=2)
    with RamBuffer.create(layout):
        with pytest.raises(BusError, match="already exists"):
            RamBuffer.create(layout)


def test_unguarded_buffer_from_a_cpp_writer_is_readable() -> None:
    """A C++ writer creates only the main object, exactly n_slots * slot bytes (upstream's
    ram_buffer.cpp; ours round up to 2 MiB, which was all attach took): readers work, without
    overwrite detection."""
    name = unique_name() + "-image"
    layout = BufferLayout(name, slot_n_bytes=8, n_slots=2)
    with open(f"/dev/shm/{name}", "wb") as f:
        f.truncate(layout.n_slots * layout.slot_n_bytes)
        f.seek(8)
        f.write(b"ABCDEFGH")
    try:
        with RamBuffer.attach(layout) as reader:
            assert not reader.guarded and reader.holds(1)
            assert reader.slot_bytes(1).tobytes() == b"ABCDEFGH"
    finally:
        os.unlink(f"/dev/shm/{name}")


def test_buffer_of_a_killed_writer_is_replaced_but_never_a_live_one() -> None:
    name = unique_name() + "-image"
    layout = BufferLayout(name, slot_n_bytes=8, n_slots=2)
    code = ("import os, signal, sys\n"
            "from stddaq.bus.ram_buffer import BufferLayout, RamBuffer\n"
            f"b = RamBuffer.create(BufferLayout({name!r}, 8, 2))\n"
            "print('ready', flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == -9 and "ready" in proc.stdout
    assert os.path.exists(f"/dev/shm/{name}")  # left behind: SIGKILL runs no cleanup
    with RamBuffer.create(layout) as replacement:  # the restarted writer takes over
        assert replacement.owner
        with pytest.raises(BusError, match="another service writes this channel"):
            RamBuffer.create(layout)  # while it lives, nobody else does
    assert not os.path.exists(f"/dev/shm/{name}")


def test_buffer_made_by_another_program_is_never_replaced() -> None:
    name = unique_name() + "-image"
    layout = BufferLayout(name, slot_n_bytes=8, n_slots=2)
    with open(f"/dev/shm/{name}", "wb") as f:
        f.truncate(layout.n_bytes)
    try:
        with pytest.raises(BusError, match="already exists"):
            RamBuffer.create(layout)
        assert os.path.exists(f"/dev/shm/{name}")
    finally:
        os.unlink(f"/dev/shm/{name}")


def test_buffer_being_created_is_waited_for_not_refused() -> None:
    """Between claiming the name and sizing it the object has 0 bytes: readers wait, and a claim
    whose creator died there is replaced by the next writer."""
    name = unique_name() + "-image"
    layout = BufferLayout(name, slot_n_bytes=8, n_slots=2)
    with open(f"/dev/shm/{name}", "wb"):
        pass  # a 0-byte claim, no guard yet
    try:
        with pytest.raises(BufferMissingError):
            RamBuffer.attach(layout)
        with RamBuffer.create(layout) as owner:  # the claim's creator is gone: taken over
            assert owner.guarded
            with RamBuffer.attach(layout) as reader:
                assert reader.guarded
    finally:
        if os.path.exists(f"/dev/shm/{name}"):
            os.unlink(f"/dev/shm/{name}")


def test_attach_never_pairs_old_slots_with_a_new_guard(monkeypatch) -> None:
    """The slots and the guard are opened one after the other: a writer re-creating the buffer
    in between gave the reader the old (unlinked) slots under the new guard, every image read
    from a mapping nobody writes any more, the guard vouching for them."""
    import stddaq.bus.ram_buffer as ram_buffer

    layout = BufferLayout(unique_name("race"), slot_n_bytes=4096, n_slots=4)
    old = RamBuffer.create(layout)
    new: list[RamBuffer] = []
    shm_open = ram_buffer._posixshmem.shm_open
    replaced = []

    def replace_first(path, *args, **kwargs):  # the writer restarts just as the reader opens the guard
        if path.endswith(GUARD_SUFFIX) and not replaced:
            replaced.append(path)
            old.close()
            new.append(RamBuffer.create(layout))
            new[0].begin_write(1)
            new[0].slot_bytes(1)[:] = 7
            new[0].end_write(1)
        return shm_open(path, *args, **kwargs)

    monkeypatch.setattr(ram_buffer._posixshmem, "shm_open", replace_first)
    try:
        with pytest.raises(BufferMissingError, match="is being re-created by its writer"):
            RamBuffer.attach(layout)
        reader = RamBuffer.attach(layout)  # the next try maps the new buffer, slots and guard
        assert reader.holds(1) and (reader.slot_bytes(1) == 7).all()
        reader.close()
    finally:
        for buffer in (old, *new):
            buffer.close()
