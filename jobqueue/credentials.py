"""Where a batch-queue cluster keeps the credentials its workers read.

With TLS (the default) the workers of a batch job need the cluster's CA and a
worker certificate and key.  They get them from one file, readable only by
the user (0600) in a directory only the user can enter (0700), passed to the
job by path; the client's and the scheduler's keys never go there.  Batch
jobs run on other nodes, so the directory must be on a file system they
share: ``shared_temp_directory`` (as in dask-jobqueue), else
:data:`DEFAULT_CREDENTIALS_DIRECTORY` in the home directory.

A cluster is secure by default, as ``LocalCluster``: with ``security=None``
it makes fresh credentials (``Security.temporary()``), its scheduler listens
on ``tls://`` and accepts only peers holding a certificate of this cluster's
CA.  The workers' credentials -- the CA certificate, the worker certificate
and its key, and nothing else -- go to ONE file on a path the jobs can read:
``<shared_temp_directory>/hpc-cluster-credentials/`` or by default
``~/.hpc-cluster/credentials/``, a directory of mode 0700, the file of mode
0600 (created so, never briefly readable by others).  The job script names
the file (``--tls-credentials PATH``); the key material is never in the
script or on a command line.  ``close()`` removes the file, and so does a
``weakref.finalize`` at garbage collection or interpreter exit.
``security=False`` is the explicit opt-out (plain ``tcp://``: anyone who can
reach the port can run code as you); a ``Security`` object is used as given.
"""

from __future__ import annotations

import logging
import os
import stat

from cluster.runtime.security import Security

logger = logging.getLogger(__name__)

#: Where the workers' credentials files go without ``shared_temp_directory``.
DEFAULT_CREDENTIALS_DIRECTORY = "~/.hpc-cluster/credentials"

#: The subdirectory of ``shared_temp_directory`` that holds the credentials files.
CREDENTIALS_SUBDIRECTORY = "hpc-cluster-credentials"


def credentials_directory(shared_temp_directory: str | os.PathLike | None = None) -> str:
    """The private directory (absolute path) for the workers' credentials files.

    ``<shared_temp_directory>/hpc-cluster-credentials``, or
    :data:`DEFAULT_CREDENTIALS_DIRECTORY` without one.  Not created here.
    """
    if shared_temp_directory is None:
        path = DEFAULT_CREDENTIALS_DIRECTORY
    else:
        path = os.path.join(os.fspath(shared_temp_directory), CREDENTIALS_SUBDIRECTORY)
    return os.path.abspath(os.path.expanduser(path))


def make_private_directory(path: str) -> str:
    """Create ``path`` (and its parents) if missing; make sure only we can enter it (0700).

    Raises:
        PermissionError: it belongs to another user.
        ValueError: it is a symbolic link or not a directory.
    """
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"credentials directory {path}: not a directory (or a symbolic link); "
                         "remove it or pass another shared_temp_directory=")
    if st.st_uid != os.geteuid():
        raise PermissionError(f"credentials directory {path} belongs to user id {st.st_uid}, "
                              f"not to us ({os.geteuid()}): pass another shared_temp_directory=")
    if stat.S_IMODE(st.st_mode) != 0o700:
        logger.info("credentials directory %s had mode %04o; making it 0700", path,
                    stat.S_IMODE(st.st_mode))
        os.chmod(path, 0o700)
    return path


def worker_security(security: Security) -> Security:
    """The part of ``security`` that workers need: the CA, the worker certificate and key, the settings.

    The client's and the scheduler's keys stay in this process.
    """
    return Security(require_encryption=security.require_encryption,
                    tls_ca_file=security.tls_ca_file, tls_ciphers=security.tls_ciphers,
                    tls_min_version=security.tls_min_version,
                    tls_max_version=security.tls_max_version,
                    tls_worker_cert=security.tls_worker_cert,
                    tls_worker_key=security.tls_worker_key)


def remove_file(path: str) -> None:
    """Finalizer: remove a credentials file (gone already is fine)."""
    try:
        os.remove(path)
    except FileNotFoundError:
        return
    except OSError as e:  # nothing to raise to at exit
        logger.error("could not remove the credentials file %s: %s", path, e)
        return
    logger.debug("removed the credentials file %s", path)
