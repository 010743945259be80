"""Files and directories that other users of the machine cannot plant, read or replace.

On a shared login node ``/tmp``, scratch and project directories are open to
hundreds of accounts.  Everything the runtime trusts on disk goes through here:

* :func:`problem_with` says what is wrong with trusting a file or directory
  (from an ``lstat``/``fstat`` result): a symbolic link, another owner than
  our effective user id, writable by group or others (and, for secrets,
  readable by them).
* :func:`open_private_directory` creates a directory 0700 (or takes an
  existing one) and returns a descriptor opened with ``O_NOFOLLOW``, checked
  with ``fstat`` *after* opening, so a swap between check and use is caught;
  files are then made relative to that descriptor
  (:func:`create_private_file`, :func:`make_private_subdirectory`).
* :func:`write_private_file` is the one writer of files others must neither
  read nor replace (scheduler files, credentials files): a random temporary
  name created ``O_EXCL|O_NOFOLLOW`` with mode 0600, then renamed over the
  target.
* :func:`read_trusted_file` opens with ``O_NOFOLLOW`` and refuses a file that
  is not ours or that others can write (or read, for secrets).

Every refusal is an :class:`~cluster.runtime.errors.UnsafePathError` that names the
path and what is wrong with it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
import tempfile

from .errors import UnsafePathError

logger = logging.getLogger(__name__)

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

#: Flags of every file we create: never an existing file, never through a symlink.
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC


def problem_with(st: os.stat_result, *, directory: bool, secret: bool = False) -> str | None:
    """What is wrong with trusting a file or directory of these stats (``None``: nothing).

    Args:
        st: its ``lstat`` (or ``fstat``) result.
        directory: it must be a directory (else a regular file).
        secret: others must not read it either.
    """
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if directory and not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if not directory and not stat.S_ISREG(st.st_mode):
        return "it is not a regular file"
    if st.st_uid != os.geteuid():
        return f"it belongs to user id {st.st_uid}, not to us (user id {os.geteuid()})"
    if mode & 0o022:
        who = "everyone" if mode & 0o002 else "its group"
        return f"{who} can write to it (mode {mode:04o})"
    if secret and mode & 0o077:
        return f"others can read it (mode {mode:04o})"
    return None


def _refuse(path: str, what: str, problem: str, advice: str = "") -> UnsafePathError:
    return UnsafePathError(f"{what} {path}: {problem}; refusing to use it"
                           + (f" ({advice})" if advice else ""))


def check_path(path: str, what: str, *, directory: bool, secret: bool = False,
               advice: str = "") -> os.stat_result:
    """``lstat`` ``path`` and raise unless it is safe to trust (see :func:`problem_with`).

    Raises:
        UnsafePathError: naming the path and the problem.
        FileNotFoundError: it does not exist.
    """
    st = os.lstat(path)
    problem = problem_with(st, directory=directory, secret=secret)
    if problem:
        raise _refuse(path, what, problem, advice)
    return st


def open_private_directory(path: str, what: str, *, create: bool = True,
                           advice: str = "") -> int:
    """A descriptor of the directory ``path``, which only we can write.

    Creates it with mode 0700 if missing (``create``; the parents must
    exist).  An existing directory must be ours, not a symbolic link, and not
    writable by group or others; this is checked with ``lstat`` and again with
    ``fstat`` on the descriptor (opened ``O_NOFOLLOW``), so a directory
    swapped in between is caught.

    Raises:
        UnsafePathError: it is unsafe (the message names the path and why).
        OSError: it cannot be created or opened.
    """
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    st = check_path(path, what, directory=True, advice=advice)
    try:
        fd = os.open(path, os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _refuse(path, what, "it was replaced by a symbolic link or a file",
                          advice) from None
        raise
    try:
        fst = os.fstat(fd)
        problem = problem_with(fst, directory=True)
        if problem is None and (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            problem = "it was replaced while we opened it"
        if problem:
            raise _refuse(path, what, problem, advice)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_private_subdirectory(parent_fd: int, prefix: str) -> tuple[str, int]:
    """Create a fresh 0700 directory with a random name under ``parent_fd``.

    Returns:
        ``(name, descriptor)`` of the new directory.
    """
    for _ in range(100):
        name = f"{prefix}{secrets.token_hex(6)}"
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            continue
        fd = os.open(name, os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC, dir_fd=parent_fd)
        return name, fd
    raise FileExistsError(errno.EEXIST, f"no free name for a directory {prefix}*")


def create_private_file(name: str, dir_fd: int | None = None) -> int:
    """Create ``name`` (relative to ``dir_fd``) for writing: a new file, mode 0600.

    ``O_EXCL|O_NOFOLLOW``: an existing file or symbolic link of that name is
    an error (``FileExistsError``), never opened or followed.
    """
    fd = os.open(name, CREATE_FLAGS, 0o600, dir_fd=dir_fd)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to ``fd``."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def write_private_file(path: str, data: str | bytes) -> str:
    """Write ``data`` to ``path`` atomically, readable and writable only by us (0600).

    The file is created under a random temporary name in the same directory
    with ``O_EXCL|O_NOFOLLOW`` and mode 0600 (never briefly readable, never
    through a planted link), then renamed over ``path`` (a symbolic link
    planted at ``path`` is replaced, not followed).  The directory is created
    (0700) if missing.  Whoever could later replace the file in a directory
    open to others gives it their own owner, which :func:`read_trusted_file`
    refuses.

    Returns:
        The absolute path written.

    Raises:
        OSError: the file cannot be written (e.g. someone else's file of that
            name sits in a sticky directory).
    """
    path = os.path.abspath(path)
    directory, base = os.path.split(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    dir_fd = os.open(directory, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    try:
        data = data.encode() if isinstance(data, str) else data
        tmp = f".{base}.{secrets.token_hex(8)}.tmp"
        fd = create_private_file(tmp, dir_fd)
        try:
            try:
                write_all(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, base, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
    finally:
        os.close(dir_fd)
    return path


def read_trusted_file(path: str, what: str, *, secret: bool = False, advice: str = "") -> str:
    """The text of ``path``, if it is a regular file of ours that others cannot write.

    Opened with ``O_NOFOLLOW`` and checked with ``fstat`` on that descriptor.

    Args:
        path: the file.
        what: what it is, for the error message ("scheduler file").
        secret: others must not be able to read it either (credentials).
        advice: what to do about a refusal, appended to the message.

    Raises:
        UnsafePathError: a symbolic link, another owner, or too open a mode.
        FileNotFoundError / OSError: it cannot be opened or read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _refuse(path, what, "it is a symbolic link", advice) from None
        raise
    with os.fdopen(fd, "r", encoding="utf-8") as f:
        problem = problem_with(os.fstat(f.fileno()), directory=False, secret=secret)
        if problem:
            raise _refuse(path, what, problem, advice)
        return f.read()


#: Name of a user's own scratch root inside a shared directory (``$TMPDIR``).
SCRATCH_ROOT_PREFIX = "cluster-worker-space-"
#: Name of the scratch root inside a directory only we can write (``$XDG_RUNTIME_DIR``).
PRIVATE_SCRATCH_ROOT = "cluster-worker-space"
#: ``$XDG_RUNTIME_DIR`` is used for worker directories only with this much free
#: space: it is usually a RAM-backed tmpfs (10% of memory by default), and
#: spilled results would fill it -- and the memory spilling is meant to free.
RUNTIME_DIR_MIN_FREE = 8 << 30


def scratch_root_name() -> str:
    """``cluster-worker-space-<uid>``: the name of our scratch root in a shared directory."""
    return f"{SCRATCH_ROOT_PREFIX}{os.geteuid()}"


def _private_runtime_root() -> str | None:
    """``$XDG_RUNTIME_DIR/cluster-worker-space`` when that directory can be used.

    It must be set, absolute, ours, mode 0700 (as the XDG specification
    requires: so nobody else can have created anything in it) and have
    :data:`RUNTIME_DIR_MIN_FREE` bytes free.
    """
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    if not base or not os.path.isabs(base):
        return None
    try:
        st = os.lstat(base)
        if problem_with(st, directory=True, secret=True) is not None:
            logger.debug("not using XDG_RUNTIME_DIR=%s: %s", base,
                         problem_with(st, directory=True, secret=True))
            return None
        vfs = os.statvfs(base)
    except OSError:
        return None
    if vfs.f_bavail * vfs.f_frsize < RUNTIME_DIR_MIN_FREE:
        logger.debug("not using XDG_RUNTIME_DIR=%s for worker directories: less than %d "
                     "bytes free", base, RUNTIME_DIR_MIN_FREE)
        return None
    return os.path.join(base, PRIVATE_SCRATCH_ROOT)


def open_scratch_root(local_directory: str | None = None) -> tuple[str, int, bool]:
    """The directory a worker makes its own directory in, which only we can write.

    Without ``local_directory``, the first of: ``$TMPDIR/cluster-worker-space-<uid>``
    when ``$TMPDIR`` itself is ours and private (a per-job scratch directory);
    ``$XDG_RUNTIME_DIR/cluster-worker-space`` when ``$XDG_RUNTIME_DIR`` is
    ours, 0700 and has :data:`RUNTIME_DIR_MIN_FREE` bytes free (in neither can
    another user pre-create the root); else ``$TMPDIR/cluster-worker-space-<uid>``
    in the shared ``$TMPDIR``, as below.  With a ``local_directory`` that is
    ours and that only we can write: that directory.  With a
    shared one (such as ``/tmp`` or ``/scratch``: writable by others but
    sticky): ``<it>/cluster-worker-space-<uid>``.  A per-user root created by
    someone else, or made a link or open to others, is not used: a fresh
    0700 directory with a random name next to it is, and a warning names the
    refused one and what is wrong with it.  A ``local_directory`` that is
    someone else's, or open to others without the sticky bit, is refused.

    Returns:
        ``(path, descriptor, temporary)``: ``temporary`` is true for a fresh
        random directory, which the caller removes when done.

    Raises:
        UnsafePathError: ``local_directory`` is unsafe (naming it and why).
        OSError: it cannot be created or opened.
    """
    if local_directory is None:
        shared = tempfile.gettempdir()
        try:
            tmp_private = problem_with(os.lstat(os.path.realpath(shared)), directory=True) is None
        except OSError:
            tmp_private = False
        private = None if tmp_private else _private_runtime_root()
        if private is not None:
            try:
                return private, open_private_directory(private, "worker scratch directory"), False
            except (UnsafePathError, OSError) as e:
                logger.warning("%s; using %s instead", e, shared)
    else:
        given = os.path.abspath(os.path.expanduser(os.fspath(local_directory)))
        with contextlib.suppress(FileExistsError):
            os.makedirs(given, mode=0o700)
        path = os.path.realpath(given)  # the user's own links are theirs to make
        st = os.lstat(path)
        problem = problem_with(st, directory=True)
        if problem is None:
            return path, open_private_directory(path, "local_directory", create=False), False
        shared_ok = (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
                     and st.st_uid in (os.geteuid(), 0))
        if not shared_ok:
            raise _refuse(given, "local_directory", problem,
                          "give a directory of your own, or a shared one with the sticky bit "
                          "such as /tmp")
        shared = path
    root = os.path.join(shared, scratch_root_name())
    try:
        return root, open_private_directory(root, "worker scratch directory"), False
    except UnsafePathError as e:
        fresh = tempfile.mkdtemp(prefix=scratch_root_name() + "-", dir=shared)  # 0700, random
        logger.warning("%s; using a fresh directory %s instead", e, fresh)
        return fresh, open_private_directory(fresh, "worker scratch directory",
                                             create=False), True


def writable_by_others(path: str) -> str | None:
    """Why another user could change what is at ``path`` (``None``: nobody but us and root).

    For ``sys.path`` entries: the entry (followed, as ``import`` follows it)
    must belong to us or to root and not be writable by group or others.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        return f"cannot be examined ({e.strerror})"
    if st.st_uid not in (os.geteuid(), 0):
        return f"belongs to user id {st.st_uid}"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        return f"{'everyone' if mode & 0o002 else 'its group'} can write to it (mode {mode:04o})"
    return None


__all__ = [
    "CREATE_FLAGS",
    "PRIVATE_SCRATCH_ROOT",
    "RUNTIME_DIR_MIN_FREE",
    "SCRATCH_ROOT_PREFIX",
    "open_scratch_root",
    "scratch_root_name",
    "check_path",
    "create_private_file",
    "make_private_subdirectory",
    "open_private_directory",
    "problem_with",
    "read_trusted_file",
    "writable_by_others",
    "write_all",
    "write_private_file",
]
