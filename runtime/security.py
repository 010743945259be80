"""TLS credentials: the ``Security`` object (dask.distributed's names) and temporary credentials.

Theory of operation
-------------------
Whoever can connect to a scheduler or a worker can make it unpickle data and
run functions as the user, so connections are authenticated both ways:

- every member of a cluster holds a certificate signed by the cluster's
  certificate authority (CA) and the CA's certificate;
- a server (scheduler, worker, nanny) accepts only clients that present a
  certificate signed by that CA (``CERT_REQUIRED`` on the server side);
- a client accepts only servers whose certificate is signed by that CA.

There is one certificate and key per role (``client``, ``scheduler``,
``worker``; a nanny uses the worker's), as in dask.distributed.  Each value is
either a path to a PEM file or the PEM text itself.

:meth:`Security.temporary` makes a fresh CA and one certificate per role in
memory.  The CA's private key is thrown away at once, so nobody -- not even
this process -- can sign another member later; the cluster is exactly the
holders of these certificates.

Hostname checking is off: the certificates are made per cluster, not per
host; a cluster's addresses are IPs chosen at run time (``interface="ib0"``,
whatever node the batch system gave us), so no name in a certificate could be
checked against them.  What identifies a peer is that its certificate is
signed by *this cluster's* CA, which only the cluster's members hold.  (With
a site-wide CA given as ``tls_ca_file`` every holder of a certificate from it
is accepted: use a CA per cluster or per user.)

``ssl.SSLContext.load_cert_chain`` reads only files.  PEM text (temporary
credentials) is therefore written to an anonymous in-memory file
(``memfd_create``, opened by OpenSSL through ``/proc/self/fd``) that never
appears in any directory and is closed right after loading; where that is not
available, to a 0600 file in a fresh 0700 directory, removed right after
loading.  The CA is loaded from memory (``cadata``).  Contexts are made once
per role and reused.

A ``Security`` pickles with its PEM text (that is how a nanny hands the
credentials to its worker process, over a private pipe); :meth:`to_file`
writes the same to a file only the user can read, :meth:`from_file` reads it
back (and refuses a file others can read).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import ssl
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from . import files as _files
from .errors import EncryptionRequiredError

logger = logging.getLogger(__name__)

#: The roles that have a certificate of their own (a nanny uses the worker's).
ROLES = ("client", "scheduler", "worker")

#: Role aliases.
_ROLE_ALIASES = {"nanny": "worker"}

#: Fields, in dask.distributed's order.
FIELDS = (
    "require_encryption",
    "tls_ca_file",
    "tls_ciphers",
    "tls_min_version",
    "tls_max_version",
    "tls_client_key",
    "tls_client_cert",
    "tls_scheduler_key",
    "tls_scheduler_cert",
    "tls_worker_key",
    "tls_worker_cert",
    "extra_conn_args",
)

_PEM_MARK = "-----BEGIN"
_FILE_FORMAT = "hpc-cluster-security/1"

#: How long temporary certificates are valid (a batch job may run for weeks).
TEMPORARY_VALIDITY = datetime.timedelta(days=365)
#: Accepted clock difference between the nodes of a cluster.
CLOCK_SKEW = datetime.timedelta(hours=1)


def _is_pem(value: str | None) -> bool:
    return isinstance(value, str) and _PEM_MARK in value


def parse_tls_version(value: Any, name: str = "tls_min_version") -> ssl.TLSVersion | None:
    """An ``ssl.TLSVersion`` from itself, ``"TLSv1.2"``, ``"TLSv1_3"``, ``"1.2"`` or ``None``.

    Raises:
        ValueError: an unknown version, or one older than TLS 1.2.
    """
    if value is None:
        return None
    if isinstance(value, ssl.TLSVersion):
        version = value
    else:
        text = str(value).strip().upper().replace("TLSV", "").replace("_", ".")
        versions = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3,
                    "1.0": ssl.TLSVersion.TLSv1, "1.1": ssl.TLSVersion.TLSv1_1,
                    "1": ssl.TLSVersion.TLSv1}
        if text not in versions:
            raise ValueError(f"{name}={value!r}: expected 'TLSv1.2' or 'TLSv1.3' "
                             "(or an ssl.TLSVersion)")
        version = versions[text]
    if version in (ssl.TLSVersion.MINIMUM_SUPPORTED, ssl.TLSVersion.MAXIMUM_SUPPORTED):
        raise ValueError(f"{name}={value!r}: name a version, 'TLSv1.2' or 'TLSv1.3'")
    if version < ssl.TLSVersion.TLSv1_2:
        raise ValueError(f"{name}={value!r}: TLS 1.2 is the oldest version accepted")
    return version


class Security:
    """TLS settings and credentials, per role (the names of dask.distributed's ``Security``).

    Each ``tls_*_cert``/``tls_*_key``/``tls_ca_file`` is a path to a PEM file
    or the PEM text itself.  A role's key may also be in its certificate file.

    Args:
        require_encryption: refuse plain ``tcp://`` addresses (default ``False``;
            ``True`` for :meth:`temporary`).
        tls_ca_file: the certificate authority that signed every member.
        tls_ciphers: OpenSSL cipher string for TLS 1.2 (TLS 1.3 suites are fixed).
        tls_min_version: oldest TLS version accepted (default and minimum: 1.2).
        tls_max_version: newest TLS version used (default: the newest).
        tls_client_key / tls_client_cert: the credentials of clients.
        tls_scheduler_key / tls_scheduler_cert: the scheduler's.
        tls_worker_key / tls_worker_cert: workers' and nannies'.
        extra_conn_args: accepted for compatibility; passed along, unused.

    Raises:
        ValueError: a TLS version older than 1.2, or an unknown one.
        TypeError: a credential that is not a string.
    """

    def __init__(self, require_encryption: bool | None = None, *, tls_ca_file: str | None = None,
                 tls_ciphers: str | None = None, tls_min_version: Any = ssl.TLSVersion.TLSv1_2,
                 tls_max_version: Any = None, tls_client_key: str | None = None,
                 tls_client_cert: str | None = None, tls_scheduler_key: str | None = None,
                 tls_scheduler_cert: str | None = None, tls_worker_key: str | None = None,
                 tls_worker_cert: str | None = None, extra_conn_args: dict | None = None):
        self.require_encryption = bool(require_encryption)
        self.tls_ca_file = tls_ca_file
        self.tls_ciphers = tls_ciphers
        self.tls_min_version = parse_tls_version(tls_min_version) or ssl.TLSVersion.TLSv1_2
        self.tls_max_version = parse_tls_version(tls_max_version, "tls_max_version")
        if self.tls_max_version is not None and self.tls_max_version < self.tls_min_version:
            raise ValueError(f"tls_max_version={self.tls_max_version.name} is older than "
                             f"tls_min_version={self.tls_min_version.name}")
        self.tls_client_key = tls_client_key
        self.tls_client_cert = tls_client_cert
        self.tls_scheduler_key = tls_scheduler_key
        self.tls_scheduler_cert = tls_scheduler_cert
        self.tls_worker_key = tls_worker_key
        self.tls_worker_cert = tls_worker_cert
        self.extra_conn_args = dict(extra_conn_args or {})
        for name in FIELDS:
            value = getattr(self, name)
            if name.startswith("tls_") and name not in ("tls_min_version", "tls_max_version"):
                if value is not None and not isinstance(value, str):
                    raise TypeError(f"{name}: expected a path or PEM text (str), "
                                    f"not {type(value).__name__}")
                if value is not None and not _is_pem(value) and name != "tls_ciphers":
                    setattr(self, name, os.path.expanduser(value))
        self._contexts: dict[tuple[str, bool, bool], ssl.SSLContext] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ making credentials

    @classmethod
    def temporary(cls, **kwargs: Any) -> Security:
        """Fresh credentials for one cluster: a CA and a certificate per role, in memory.

        The CA's private key is discarded once the certificates are signed.
        ``require_encryption`` is on unless ``kwargs`` say otherwise.

        Args:
            **kwargs: more ``Security`` settings (``tls_min_version``, ...).
        """
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = now - CLOCK_SKEW, now + TEMPORARY_VALIDITY
        cluster_id = uuid.uuid4().hex[:12]

        def name(text: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

        def usage(cert_sign: bool) -> x509.KeyUsage:
            return x509.KeyUsage(digital_signature=not cert_sign, content_commitment=False,
                                 key_encipherment=False, data_encipherment=False,
                                 key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
                                 encipher_only=False, decipher_only=False)

        # ECDSA P-256: keys are made in microseconds and handshakes are cheaper than with RSA.
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = name(f"hpc-cluster CA {cluster_id}")
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name).issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage(cert_sign=True), critical=True)
            .add_extension(ca_ski, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        creds: dict[str, str] = {"tls_ca_file": ca_cert.public_bytes(pem).decode()}
        for role in ROLES:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = (
                x509.CertificateBuilder()
                .subject_name(name(f"hpc-cluster {role} {cluster_id}")).issuer_name(ca_name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(usage(cert_sign=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                               critical=False)
                .sign(ca_key, hashes.SHA256())
            )
            creds[f"tls_{role}_cert"] = cert.public_bytes(pem).decode()
            creds[f"tls_{role}_key"] = key.private_bytes(
                pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
        del ca_key
        kwargs.setdefault("require_encryption", True)
        return cls(**{**creds, **kwargs})

    # ------------------------------------------------------------------ per role

    @staticmethod
    def _role(role: str) -> str:
        role = _ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            raise ValueError(f"role={role!r}: expected one of {', '.join(ROLES)} (or 'nanny')")
        return role

    def get_tls_config_for_role(self, role: str) -> dict[str, Any]:
        """The TLS settings of ``role``: ``ca_file``, ``key``, ``cert``, ``ciphers``, versions."""
        role = self._role(role)
        return {
            "ca_file": self.tls_ca_file,
            "key": getattr(self, f"tls_{role}_key"),
            "cert": getattr(self, f"tls_{role}_cert"),
            "ciphers": self.tls_ciphers,
            "min_version": self.tls_min_version,
            "max_version": self.tls_max_version,
        }

    def has_tls(self, role: str | None = None) -> bool:
        """Whether there is a CA and (for ``role``, or any role) a certificate."""
        if self.tls_ca_file is None:
            return False
        roles = ROLES if role is None else (self._role(role),)
        return any(getattr(self, f"tls_{r}_cert") is not None for r in roles)

    def _get_context(self, role: str, server_side: bool,
                     require_client_cert: bool = True) -> ssl.SSLContext | None:
        role = self._role(role)
        if not self.has_tls(role):
            return None
        with self._lock:
            ctx = self._contexts.get((role, server_side, require_client_cert))
            if ctx is None:
                try:
                    ctx = self._make_context(role, server_side)
                except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
                    raise ValueError(f"security: cannot load the TLS credentials of role "
                                     f"{role!r}: {e}") from e
                if not require_client_cert:
                    ctx.verify_mode = ssl.CERT_OPTIONAL
                self._contexts[(role, server_side, require_client_cert)] = ctx
            return ctx

    def _make_context(self, role: str, server_side: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
        # Per-cluster certificates, IP addresses chosen at run time: no name to
        # check (see the module docstring).  The CA is the identity check.
        ctx.check_hostname = False
        # Both ways: servers demand a client certificate signed by the CA,
        # clients demand the same of servers.
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.minimum_version = self.tls_min_version
        if self.tls_max_version is not None:
            ctx.maximum_version = self.tls_max_version
        ctx.options |= ssl.OP_NO_COMPRESSION
        if server_side:
            # Nothing here resumes a TLS session (every connection is a full,
            # mutually authenticated handshake), so TLS 1.3 session tickets would
            # only cost the server an encryption and a message per connection.
            ctx.num_tickets = 0
        if self.tls_ciphers:
            ctx.set_ciphers(self.tls_ciphers)
        ca = self.tls_ca_file
        if _is_pem(ca):
            ctx.load_verify_locations(cadata=ca)
        else:
            ctx.load_verify_locations(cafile=ca)
        cert = getattr(self, f"tls_{role}_cert")
        key = getattr(self, f"tls_{role}_key")
        _load_cert_chain(ctx, cert, key)
        return ctx

    def get_server_context(self, role: str, require_client_cert: bool = True) -> ssl.SSLContext | None:
        """The ``ssl.SSLContext`` a server of ``role`` listens with (``None``: no TLS for it).

        Args:
            role: ``"scheduler"``, ``"worker"`` or ``"client"``.
            require_client_cert: ``False`` makes the peer's certificate
                optional (still verified when given): for the status page,
                whose browsers hold no certificate and authenticate by token.

        Raises:
            ValueError: a credential cannot be read or does not parse.
        """
        return self._get_context(role, server_side=True, require_client_cert=require_client_cert)

    def get_client_context(self, role: str) -> ssl.SSLContext | None:
        """The ``ssl.SSLContext`` ``role`` connects with (``None``: no TLS for it).

        Raises:
            ValueError: a credential cannot be read or does not parse.
        """
        return self._get_context(role, server_side=False)

    def get_connection_args(self, role: str) -> dict[str, Any]:
        """Keyword arguments for ``comm.connect`` as ``role``."""
        return {"ssl_context": self.get_client_context(role),
                "require_encryption": self.require_encryption,
                "extra_conn_args": self.extra_conn_args}

    def get_listen_args(self, role: str) -> dict[str, Any]:
        """Keyword arguments for ``comm.listen`` as ``role``."""
        return {"ssl_context": self.get_server_context(role),
                "require_encryption": self.require_encryption,
                "extra_conn_args": self.extra_conn_args}

    # ------------------------------------------------------------------ files and pickles

    def _fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELDS}

    def __getstate__(self) -> dict[str, Any]:
        return self._fields()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Security):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = []
        for name in FIELDS:
            value = getattr(self, name)
            if value is None or name == "extra_conn_args":
                continue
            if name.endswith("_key"):
                value = "<key>"
            elif _is_pem(value):
                value = "Temporary (In-memory)"
            elif isinstance(value, ssl.TLSVersion):
                value = value.name
            shown.append(f"{name}={value!r}")
        return f"Security({', '.join(shown)})"

    def to_dict(self, roles: Iterable[str] | None = None) -> dict[str, Any]:
        """These settings as JSON-safe data (PEM text included; paths made absolute).

        Args:
            roles: keep only these roles' certificates and keys (the CA always
                stays): the MPI launcher sends workers and the client what
                they need, and the scheduler's key never leaves rank 0.
        """
        data = self._fields()
        for name in ("tls_min_version", "tls_max_version"):
            if data[name] is not None:
                data[name] = data[name].name
        for name in FIELDS:
            value = data[name]
            if (name.endswith(("_key", "_cert", "_file")) and isinstance(value, str)
                    and not _is_pem(value)):
                data[name] = os.path.abspath(value)
        if roles is not None:
            keep = {self._role(r) for r in roles}
            for role in ROLES:
                if role not in keep:
                    data[f"tls_{role}_cert"] = data[f"tls_{role}_key"] = None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Security:
        """The inverse of :meth:`to_dict` (unknown entries are ignored)."""
        return cls(**{k: data.get(k) for k in FIELDS if k in data})

    def to_file(self, path: str) -> str:
        """Write these settings (PEM text included) to ``path``, readable only by the user (0600).

        Paths stay paths: only credentials given as text are copied into the file.

        Returns:
            The absolute path written.
        """
        path = os.path.abspath(path)
        write_private_file(path, json.dumps({"format": _FILE_FORMAT, **self.to_dict()}, indent=1))
        return path

    @classmethod
    def from_file(cls, path: str) -> Security:
        """Read a file written by :meth:`to_file`.

        Raises:
            UnsafePathError: (a ``PermissionError``) the file can be read or
                written by others than its owner, its owner is not us, or it is
                a symbolic link.
            ValueError: the file is not a security file.
            OSError: it cannot be read.
        """
        text = _files.read_trusted_file(
            path, "credentials file", secret=True,
            advice=f"it must be yours and readable only by you: chmod 600 {path}")
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path} is not a credentials file: {e}") from None
        if not isinstance(data, dict) or data.get("format") != _FILE_FORMAT:
            raise ValueError(f"{path} is not a credentials file (format {_FILE_FORMAT} expected)")
        return cls.from_dict(data)


# ----------------------------------------------------------------------------- helpers


def resolve_security(security: Security | bool | None, default: bool = False,
                     owner: str | None = None) -> Security | None:
    """The ``Security`` that a ``security=`` argument stands for.

    ``True`` means :meth:`Security.temporary`, ``False`` means none; ``None``
    means temporary credentials if ``default`` is true, none otherwise.

    Args:
        security: the argument.
        default: what ``None`` means.
        owner: for a server or client that joins an existing cluster (a
            worker, a nanny, a client given an address), its name: ``True``
            is refused, as fresh credentials would be trusted by nobody.

    Raises:
        TypeError: ``security`` is something else.
        ValueError: ``True`` for an ``owner``.
    """
    if security is None:
        security = default
    if security is True:
        if owner is not None:
            raise ValueError(f"{owner}: security=True makes fresh credentials that no existing "
                             "scheduler trusts; pass the cluster's Security object")
        return Security.temporary()
    if security is False:
        return None
    if isinstance(security, Security):
        return security
    raise TypeError(f"security={security!r}: expected a Security object, True (temporary "
                    "credentials) or False/None (no TLS)")


def security_from_scheduler_info(info: dict, scheduler_file: str,
                                 allow_plain: bool = False) -> Security | None:
    """The credentials a scheduler file points to (``None`` if it names none).

    A file that names no credentials and a plain ``tcp://`` address is refused
    unless ``allow_plain`` (the user opted out of TLS: ``security=False``,
    ``--no-tls``): whoever wrote such a file first would have our workers run
    their tasks, or our client unpickle their replies.

    Raises:
        EncryptionRequiredError: a plain ``tcp://`` address without ``allow_plain``.
        PermissionError / ValueError / OSError: see :meth:`Security.from_file`.
    """
    path = info.get("security")
    if not path:
        address = str(info.get("address", ""))
        if address.startswith("tcp://") and not allow_plain:
            raise EncryptionRequiredError(
                f"scheduler file {scheduler_file} leads to {address}, a scheduler without TLS: "
                "refusing it, since anyone who can reach that port (or who wrote the file) "
                "could run code as you. To use a cluster without TLS anyway, opt in: "
                "security=False (Client, Worker, Nanny) or --no-tls (python -m cluster worker)")
        return None
    if not os.path.isabs(path):
        path = os.path.join(os.path.dirname(os.path.abspath(scheduler_file)), path)
    return Security.from_file(path)


def credentials_path(scheduler_file: str) -> str:
    """Where a scheduler keeps the credentials its scheduler file points to."""
    return os.path.abspath(scheduler_file) + ".credentials"


def write_private_file(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable and writable only by the user (0600).

    Through :func:`cluster.runtime.files.write_private_file`: a random temporary name
    created ``O_EXCL|O_NOFOLLOW`` with mode 0600, then renamed over ``path``.
    """
    _files.write_private_file(path, text)


def _read_text(value: str) -> str:
    if _is_pem(value):
        return value
    with open(value) as f:
        return f.read()


def _load_cert_chain(ctx: ssl.SSLContext, cert: str, key: str | None) -> None:
    """``ctx.load_cert_chain`` for credentials given as paths or as PEM text."""
    if not _is_pem(cert) and (key is None or not _is_pem(key)):
        ctx.load_cert_chain(cert, key)
        return
    text = _read_text(cert).rstrip("\n") + "\n"
    if key is not None:
        text += _read_text(key)
    with _private_path(text.encode()) as path:
        ctx.load_cert_chain(path)


@contextlib.contextmanager
def _private_path(data: bytes) -> Iterator[str]:
    """A path that reads as ``data``, visible to nobody else, gone when the block ends.

    An anonymous memory file (Linux ``memfd_create``) when possible, else a
    0600 file in a fresh 0700 directory.
    """
    fd = -1
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            fd = os.memfd_create("cluster-tls", getattr(os, "MFD_CLOEXEC", 0))
    if fd >= 0:
        try:
            _write_all(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    directory = tempfile.mkdtemp(prefix="cluster-tls-")  # mode 0700
    path = os.path.join(directory, "credentials.pem")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.rmdir(directory)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# ----------------------------------------------------------------------------- this process's servers

_local_lock = threading.Lock()
_local_credentials: dict[str, Security] = {}


def register_local_credentials(address: str, security: Security) -> None:
    """Remember the credentials of a server running in this process.

    A ``Client`` made in this process without ``security=`` finds them by the
    server's address: the script that ``python -m cluster script.py`` runs next
    to its local cluster, for example.  They never leave the process.
    """
    with _local_lock:
        _local_credentials[address] = security


def unregister_local_credentials(address: str) -> None:
    with _local_lock:
        _local_credentials.pop(address, None)


def local_credentials(address: str) -> Security | None:
    """The credentials registered for ``address`` in this process, if any."""
    with _local_lock:
        return _local_credentials.get(address)


__all__ = [
    "FIELDS",
    "ROLES",
    "Security",
    "credentials_path",
    "local_credentials",
    "parse_tls_version",
    "register_local_credentials",
    "resolve_security",
    "security_from_scheduler_info",
    "unregister_local_credentials",
    "write_private_file",
]
