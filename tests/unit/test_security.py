"""``runtime.security``: credentials, contexts, files and pickles -- no sockets.

Handshakes here run between two ``ssl.SSLObject`` over memory buffers, so
mutual authentication is checked without the network.
"""

from __future__ import annotations

import json
import os
import pickle
import ssl
import stat

import pytest
from cluster.runtime import security as security_module
from cluster.runtime.errors import EncryptionRequiredError
from cluster.runtime.security import (
    FIELDS,
    Security,
    credentials_path,
    parse_tls_version,
    resolve_security,
    security_from_scheduler_info,
    write_private_file,
)

pytestmark = pytest.mark.timeout(60)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext):
    """Run a TLS handshake in memory; return ``(server_error, client_error)`` (``None``: fine)."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    ends = [(client, c_out, s_in), (server, s_out, c_in)]
    done: dict = {}
    errors: dict = {}
    for _ in range(20):
        for obj, out, peer_in in ends:
            if obj not in done and obj not in errors:
                try:
                    obj.do_handshake()
                    done[obj] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as e:
                    errors[obj] = e
            data = out.read()
            if data:
                peer_in.write(data)
        if len(done) + len(errors) == 2:
            break
    if client in done and server in done:
        # Data both ways: in TLS 1.3 a refused client certificate shows on the client only here.
        client.write(b"ping")
        s_in.write(c_out.read())
        try:
            assert server.read(4) == b"ping"
            server.write(b"pong")
            c_in.write(s_out.read())
            assert client.read(4) == b"pong"
        except ssl.SSLError as e:  # pragma: no cover - reported below
            errors.setdefault(server, e)
    return errors.get(server), errors.get(client)


# ----------------------------------------------------------------------------- contexts


@pytest.mark.parametrize("role", ["client", "scheduler", "worker", "nanny"])
def test_temporary_contexts_are_tls12_or_newer_and_verify_both_ways(sec, role):
    for ctx in (sec.get_server_context(role), sec.get_client_context(role)):
        assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.check_hostname is False
        assert ctx.options & ssl.OP_NO_COMPRESSION
    assert sec.get_server_context(role) is sec.get_server_context(role)  # made once


def test_temporary_is_encrypted_and_fresh_each_time(sec, other):
    assert sec.require_encryption is True
    assert sec.has_tls() and all(sec.has_tls(r) for r in ("client", "scheduler", "worker"))
    assert sec.tls_ca_file != other.tls_ca_file
    assert sec.tls_worker_key != other.tls_worker_key
    # no CA key anywhere: nobody can sign another member later
    assert not any("ca_key" in name for name in FIELDS)
    assert sum("PRIVATE KEY" in str(getattr(sec, n)) for n in FIELDS) == 3


def test_mutual_authentication_in_memory(sec):
    assert handshake(sec.get_server_context("scheduler"), sec.get_client_context("client")) == (None, None)
    assert handshake(sec.get_server_context("worker"), sec.get_client_context("worker")) == (None, None)


def test_client_refuses_a_server_of_another_ca(sec, other):
    server_err, client_err = handshake(other.get_server_context("scheduler"),
                                       sec.get_client_context("client"))
    assert isinstance(client_err, ssl.SSLCertVerificationError)


def test_server_refuses_a_client_certificate_of_another_ca(sec, other):
    # The client trusts the server's CA but holds a certificate from another CA.
    impostor = Security(tls_ca_file=sec.tls_ca_file, tls_client_cert=other.tls_client_cert,
                        tls_client_key=other.tls_client_key)
    server_err, _ = handshake(sec.get_server_context("scheduler"), impostor.get_client_context("client"))
    assert isinstance(server_err, ssl.SSLError)
    assert "certificate" in str(server_err).lower()


def test_server_refuses_a_client_without_certificate(sec):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=sec.tls_ca_file)
    server_err, _ = handshake(sec.get_server_context("scheduler"), ctx)
    assert isinstance(server_err, ssl.SSLError)
    assert "certificate" in str(server_err).lower()


def test_tls_versions_below_12_are_refused(sec):
    for bad in ("TLSv1.1", "1.0", ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        with pytest.raises(ValueError, match="TLS 1.2"):
            Security(tls_min_version=bad)
    with pytest.raises(ValueError, match="tls_min_version"):
        Security(tls_min_version="SSLv3")
    assert parse_tls_version("TLSv1.3") is ssl.TLSVersion.TLSv1_3
    assert parse_tls_version("1.2") is ssl.TLSVersion.TLSv1_2
    assert parse_tls_version("TLSv1_3") is ssl.TLSVersion.TLSv1_3
    with pytest.raises(ValueError, match="older than"):
        Security(tls_min_version="1.3", tls_max_version="1.2")


def test_tls13_only(sec):
    strict = Security.temporary(tls_min_version="TLSv1.3")
    ctx = strict.get_server_context("scheduler")
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert handshake(ctx, strict.get_client_context("client")) == (None, None)


def test_no_tls_means_no_context():
    plain = Security()
    assert not plain.has_tls()
    assert plain.get_connection_args("client")["ssl_context"] is None
    assert plain.get_listen_args("scheduler") == {"ssl_context": None, "require_encryption": False,
                                                  "extra_conn_args": {}}
    with pytest.raises(ValueError, match="role"):
        plain.get_server_context("janitor")


def test_credentials_as_files(sec, tmp_path):
    paths = {}
    for name in ("tls_ca_file", "tls_scheduler_cert", "tls_scheduler_key", "tls_client_cert",
                 "tls_client_key"):
        p = tmp_path / name
        p.write_text(getattr(sec, name))
        paths[name] = str(p)
    from_files = Security(**paths)
    assert handshake(from_files.get_server_context("scheduler"),
                     from_files.get_client_context("client")) == (None, None)
    # cert and key in one file
    both = tmp_path / "both.pem"
    both.write_text(sec.tls_worker_cert + sec.tls_worker_key)
    one = Security(tls_ca_file=paths["tls_ca_file"], tls_worker_cert=str(both))
    assert one.get_client_context("worker") is not None


def test_unreadable_credentials_are_a_clear_error(sec, tmp_path):
    bad = Security(tls_ca_file=sec.tls_ca_file, tls_scheduler_cert=str(tmp_path / "missing.pem"),
                   tls_scheduler_key=str(tmp_path / "missing.key"))
    with pytest.raises(ValueError, match="scheduler"):
        bad.get_listen_args("scheduler")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match="worker"):
        Security(tls_ca_file=sec.tls_ca_file, tls_worker_cert=str(garbage)).get_client_context("worker")
    with pytest.raises(TypeError, match="tls_ca_file"):
        Security(tls_ca_file=b"bytes")


def test_pem_loading_without_memfd_uses_a_private_directory(sec, monkeypatch):
    monkeypatch.delattr(os, "memfd_create", raising=False)
    seen = {}
    real = ssl.SSLContext.load_cert_chain

    def spy(self, certfile, keyfile=None, password=None):
        seen["path"] = certfile
        seen["file_mode"] = mode(certfile)
        seen["dir_mode"] = mode(os.path.dirname(certfile))
        return real(self, certfile, keyfile, password)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", spy)
    fresh = pickle.loads(pickle.dumps(sec))  # no cached contexts
    assert fresh.get_client_context("client") is not None
    assert seen["file_mode"] == 0o600 and seen["dir_mode"] == 0o700
    assert not os.path.exists(seen["path"])
    assert not os.path.exists(os.path.dirname(seen["path"]))


# ----------------------------------------------------------------------------- pickles and files


def test_security_pickles_with_its_credentials(sec):
    sec.get_server_context("scheduler")  # cached contexts are not pickled
    back = pickle.loads(pickle.dumps(sec))
    assert back == sec
    assert back.get_server_context("scheduler") is not sec.get_server_context("scheduler")
    assert handshake(back.get_server_context("scheduler"), sec.get_client_context("client")) == (None, None)


def test_repr_never_shows_keys(sec):
    text = repr(sec)
    assert "PRIVATE KEY" not in text and "BEGIN" not in text
    assert "tls_client_key='<key>'" in text and "require_encryption=True" in text


def test_credentials_file_is_private_and_round_trips(sec, tmp_path):
    path = sec.to_file(str(tmp_path / "creds"))
    assert mode(path) == 0o600
    assert Security.from_file(path) == sec
    assert [p.name for p in tmp_path.iterdir()] == ["creds"]  # no temporary left over


def test_credentials_file_keeps_paths_as_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Security(tls_ca_file="ca.pem", tls_client_cert="c.pem", tls_client_key="k.pem",
                 tls_min_version="TLSv1.3")
    s.to_file("creds.json")
    data = json.loads((tmp_path / "creds.json").read_text())
    assert data["tls_ca_file"] == str(tmp_path / "ca.pem")
    assert data["tls_min_version"] == "TLSv1_3"
    back = Security.from_file(str(tmp_path / "creds.json"))
    assert back.tls_min_version == ssl.TLSVersion.TLSv1_3


def test_credentials_file_readable_by_others_or_not_ours_is_refused(sec, tmp_path):
    path = sec.to_file(str(tmp_path / "creds"))
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        Security.from_file(path)
    os.chmod(path, 0o600)
    if os.geteuid() == 0:  # only root can give a file away
        os.chown(path, 65534, 65534)
        with pytest.raises(PermissionError, match="belongs to user id 65534"):
            Security.from_file(path)
    not_ours = tmp_path / "other.json"
    write_private_file(str(not_ours), json.dumps({"address": "x"}))
    with pytest.raises(ValueError, match="not a credentials file"):
        Security.from_file(str(not_ours))


def test_write_private_file_ignores_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        write_private_file(str(tmp_path / "f"), "secret")
    finally:
        os.umask(old)
    assert mode(tmp_path / "f") == 0o600
    assert (tmp_path / "f").read_text() == "secret"
    write_private_file(str(tmp_path / "f"), "again")  # replaces
    assert (tmp_path / "f").read_text() == "again" and mode(tmp_path / "f") == 0o600


def test_security_from_scheduler_info(sec, tmp_path):
    sched = tmp_path / "sched.json"
    cred = credentials_path(str(sched))
    assert cred == str(sched) + ".credentials"
    sec.to_file(cred)
    assert security_from_scheduler_info({"address": "tls://x:1", "security": cred}, str(sched)) == sec
    # plain tcp:// only for a user who opted out of TLS
    assert security_from_scheduler_info({"address": "tcp://x:1"}, str(sched),
                                        allow_plain=True) is None
    with pytest.raises(EncryptionRequiredError, match=r"security=False .* --no-tls"):
        security_from_scheduler_info({"address": "tcp://x:1"}, str(sched))


def test_resolve_security():
    assert resolve_security(None) is None and resolve_security(False) is None
    assert resolve_security(None, default=True).has_tls()
    assert resolve_security(True).require_encryption
    s = Security()
    assert resolve_security(s) is s
    with pytest.raises(ValueError, match="no existing scheduler trusts"):
        resolve_security(True, owner="Worker")
    with pytest.raises(TypeError, match="security="):
        resolve_security("yes")


def test_local_credentials_registry(sec):
    addr = "tls://127.0.0.1:65000"
    assert security_module.local_credentials(addr) is None
    security_module.register_local_credentials(addr, sec)
    try:
        assert security_module.local_credentials(addr) is sec
    finally:
        security_module.unregister_local_credentials(addr)
    assert security_module.local_credentials(addr) is None
