"""The file checks of runtime.files: owner, mode, symbolic links, O_EXCL (issue 16)."""

from __future__ import annotations

import os
import stat
import threading

import pytest
from cluster.runtime.errors import UnsafePathError
from cluster.runtime.files import (
    create_private_file,
    make_private_subdirectory,
    open_private_directory,
    open_scratch_root,
    problem_with,
    read_trusted_file,
    scratch_root_name,
    writable_by_others,
    write_private_file,
)
from cluster.runtime.spill import SpillBuffer

pytestmark = pytest.mark.timeout(60)

#: A user id that is not ours (``nobody``), for files chowned away (needs root).
FOREIGN_UID = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def mode_of(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# ----------------------------------------------------------------------------- problem_with


def test_problem_with_names_each_problem(tmp_path):
    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    f = tmp_path / "f"
    f.write_text("x")
    os.chmod(f, 0o600)
    link = tmp_path / "link"
    link.symlink_to(d)
    assert problem_with(os.lstat(d), directory=True) is None
    assert problem_with(os.lstat(f), directory=False, secret=True) is None
    assert problem_with(os.lstat(link), directory=True) == "it is a symbolic link"
    assert problem_with(os.lstat(f), directory=True) == "it is not a directory"
    assert problem_with(os.lstat(d), directory=False) == "it is not a regular file"
    os.chmod(d, 0o777)
    assert "everyone can write to it (mode 0777)" == problem_with(os.lstat(d), directory=True)
    os.chmod(d, 0o770)
    assert "its group can write" in problem_with(os.lstat(d), directory=True)
    os.chmod(f, 0o644)
    assert problem_with(os.lstat(f), directory=False) is None
    assert "others can read it (mode 0644)" == problem_with(os.lstat(f), directory=False,
                                                             secret=True)


@needs_root
def test_problem_with_a_foreign_owner(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    os.chmod(f, 0o600)
    os.chown(f, FOREIGN_UID, -1)
    assert f"belongs to user id {FOREIGN_UID}" in problem_with(os.lstat(f), directory=False)
    assert f"belongs to user id {FOREIGN_UID}" in writable_by_others(str(f))


# ----------------------------------------------------------------------------- directories


def test_open_private_directory_creates_0700_and_refuses_unsafe_ones(tmp_path):
    fresh = tmp_path / "fresh"
    fd = open_private_directory(str(fresh), "test directory")
    os.close(fd)
    assert mode_of(fresh) == 0o700
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with pytest.raises(UnsafePathError, match=rf"test directory {open_dir}: everyone can write"):
        open_private_directory(str(open_dir), "test directory")
    link = tmp_path / "link"
    link.symlink_to(fresh)
    with pytest.raises(UnsafePathError, match=rf"{link}: it is a symbolic link"):
        open_private_directory(str(link), "test directory")


@needs_root
def test_open_private_directory_refuses_a_foreign_one(tmp_path):
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, FOREIGN_UID, -1)
    with pytest.raises(UnsafePathError, match=f"belongs to user id {FOREIGN_UID}"):
        open_private_directory(str(d), "test directory")


def test_private_subdirectories_get_fresh_random_names(tmp_path):
    fd = open_private_directory(str(tmp_path / "root"), "root")
    try:
        made = [make_private_subdirectory(fd, "w-") for _ in range(5)]
        assert len({name for name, _ in made}) == 5
        for name, sub in made:
            assert mode_of(tmp_path / "root" / name) == 0o700
            os.close(sub)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- files


def test_create_private_file_never_opens_an_existing_file_or_link(tmp_path):
    fd = create_private_file(str(tmp_path / "new"))
    os.close(fd)
    assert mode_of(tmp_path / "new") == 0o600
    (tmp_path / "target").write_text("precious")
    (tmp_path / "planted").symlink_to(tmp_path / "target")
    for name in ("new", "planted"):
        with pytest.raises(FileExistsError):
            create_private_file(str(tmp_path / name))
    assert (tmp_path / "target").read_text() == "precious"


def test_create_private_file_race_has_one_winner(tmp_path):
    """Many threads create the same name at once: exactly one gets it (O_EXCL)."""
    results: list[str] = []
    barrier = threading.Barrier(8)

    def attempt() -> None:
        barrier.wait(5)
        try:
            os.close(create_private_file(str(tmp_path / "contested")))
            results.append("won")
        except FileExistsError:
            results.append("lost")

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(results) == ["lost"] * 7 + ["won"]


def test_write_private_file_replaces_a_planted_link_without_following_it(tmp_path):
    victim = tmp_path / "unrelated"
    victim.write_text("keep me")
    os.chmod(victim, 0o600)
    target = tmp_path / "sched.json"
    target.symlink_to(victim)
    # The old writer's predictable temporary name, planted as a link too.
    (tmp_path / f"sched.json.{os.getpid()}.tmp").symlink_to(victim)
    write_private_file(str(target), '{"address": "tls://127.0.0.1:1"}')
    assert victim.read_text() == "keep me"
    assert not target.is_symlink() and mode_of(target) == 0o600
    assert read_trusted_file(str(target), "scheduler file") == '{"address": "tls://127.0.0.1:1"}'
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp") and
                 not p.is_symlink()]
    assert leftovers == []


def test_read_trusted_file_refuses_links_and_open_modes(tmp_path):
    f = tmp_path / "f"
    write_private_file(str(f), "secret")
    assert read_trusted_file(str(f), "credentials file", secret=True) == "secret"
    link = tmp_path / "link"
    link.symlink_to(f)
    with pytest.raises(UnsafePathError, match=rf"scheduler file {link}: it is a symbolic link"):
        read_trusted_file(str(link), "scheduler file")
    os.chmod(f, 0o620)
    with pytest.raises(UnsafePathError, match="its group can write to it"):
        read_trusted_file(str(f), "scheduler file")
    os.chmod(f, 0o644)
    assert read_trusted_file(str(f), "scheduler file") == "secret"
    with pytest.raises(UnsafePathError, match=r"others can read it \(mode 0644\)"):
        read_trusted_file(str(f), "credentials file", secret=True)


@needs_root
def test_read_trusted_file_refuses_a_foreign_file(tmp_path):
    f = tmp_path / "f"
    write_private_file(str(f), "{}")
    os.chown(f, FOREIGN_UID, -1)
    with pytest.raises(UnsafePathError, match=f"belongs to user id {FOREIGN_UID}"):
        read_trusted_file(str(f), "scheduler file")


# ----------------------------------------------------------------------------- scratch roots


def test_scratch_root_is_per_user_in_a_shared_sticky_directory(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    path, fd, temporary = open_scratch_root(str(shared))
    os.close(fd)
    assert path == str(shared / scratch_root_name()) and not temporary
    assert mode_of(path) == 0o700


def test_scratch_root_open_to_others_is_bypassed(tmp_path, caplog):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    planted = shared / scratch_root_name()
    planted.mkdir()
    os.chmod(planted, 0o777)
    with caplog.at_level("WARNING", logger="cluster.runtime.files"):
        path, fd, temporary = open_scratch_root(str(shared))
    os.close(fd)
    assert temporary and path != str(planted) and os.path.dirname(path) == str(shared)
    assert mode_of(path) == 0o700
    assert any(str(planted) in r.getMessage() and "everyone can write" in r.getMessage()
               for r in caplog.records)
    os.rmdir(path)


@pytest.fixture
def shared_tmpdir(tmp_path, monkeypatch):
    """``$TMPDIR`` a shared sticky directory, as ``/tmp`` is."""
    import tempfile

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    monkeypatch.setenv("TMPDIR", str(shared))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    return shared


def test_scratch_root_prefers_a_private_runtime_directory(tmp_path, shared_tmpdir, monkeypatch):
    """In XDG_RUNTIME_DIR (ours, 0700) nobody else can pre-create the root."""
    import cluster.runtime.files as files

    runtime_dir = tmp_path / "run-user"
    runtime_dir.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime_dir))
    monkeypatch.setattr(files, "RUNTIME_DIR_MIN_FREE", 0)
    path, fd, temporary = open_scratch_root()
    os.close(fd)
    assert path == str(runtime_dir / files.PRIVATE_SCRATCH_ROOT) and not temporary
    assert mode_of(path) == 0o700
    # Too little room there (it is usually RAM): the per-user root in $TMPDIR.
    monkeypatch.setattr(files, "RUNTIME_DIR_MIN_FREE", 1 << 62)
    path, fd, temporary = open_scratch_root()
    os.close(fd)
    assert path == str(shared_tmpdir / scratch_root_name()) and not temporary


@pytest.mark.parametrize("mode", [0o755, 0o1777])
def test_runtime_directory_others_can_enter_is_not_used(tmp_path, shared_tmpdir, monkeypatch,
                                                        mode):
    import cluster.runtime.files as files

    runtime_dir = tmp_path / "run-user"
    runtime_dir.mkdir()
    os.chmod(runtime_dir, mode)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime_dir))
    monkeypatch.setattr(files, "RUNTIME_DIR_MIN_FREE", 0)
    path, fd, temporary = open_scratch_root()
    os.close(fd)
    assert path == str(shared_tmpdir / scratch_root_name())
    assert not os.path.exists(runtime_dir / files.PRIVATE_SCRATCH_ROOT)


def test_private_tmpdir_is_used_before_the_runtime_directory(tmp_path, monkeypatch):
    import tempfile

    import cluster.runtime.files as files

    job_tmp = tmp_path / "job"  # a per-job $TMPDIR, ours alone
    job_tmp.mkdir(mode=0o700)
    runtime_dir = tmp_path / "run-user"
    runtime_dir.mkdir(mode=0o700)
    monkeypatch.setenv("TMPDIR", str(job_tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime_dir))
    monkeypatch.setattr(files, "RUNTIME_DIR_MIN_FREE", 0)
    path, fd, temporary = open_scratch_root()
    os.close(fd)
    assert path == str(job_tmp / scratch_root_name()) and not temporary


def test_local_directory_open_to_others_without_sticky_bit_is_refused(tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(UnsafePathError, match=rf"local_directory {d}: everyone can write"):
        open_scratch_root(str(d))


# ----------------------------------------------------------------------------- spill files


def test_spill_files_are_0600_in_a_0700_directory(tmp_path):
    directory = tmp_path / "storage"
    with SpillBuffer(str(directory), target=0) as buf:
        buf["x"] = b"a" * 100
        (name,) = os.listdir(directory)
        assert mode_of(directory) == 0o700
        assert mode_of(directory / name) == 0o600


def test_spill_directory_open_to_others_is_refused(tmp_path):
    directory = tmp_path / "storage"
    directory.mkdir()
    os.chmod(directory, 0o777)
    with pytest.raises(UnsafePathError, match=rf"spill directory {directory}: everyone can write"):
        SpillBuffer(str(directory), target=0)


def test_spill_file_swapped_for_a_link_is_not_followed(tmp_path):
    directory = tmp_path / "storage"
    with SpillBuffer(str(directory), target=0) as buf:
        buf["x"] = b"a" * 100
        (name,) = os.listdir(directory)
        os.unlink(directory / name)
        (directory / name).symlink_to(tmp_path / "elsewhere")
        (tmp_path / "elsewhere").write_bytes(b"whatever")
        with pytest.raises(OSError):
            buf["x"]
