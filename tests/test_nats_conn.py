"""nats_conn: backend URLs (parsing, errors, redaction), connecting to real servers (token, user/password,
nkey, TLS with client certificates, refused credentials, nothing listening), and `retrying` through a
leader kill in a 3-node cluster."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import ipaddress
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import nats.errors
import nats.js.errors
import nkeys
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cc_tasks.errors import BackendUnreachableError, ConfigError, NatsConfigError
from cc_tasks.nats_conn import (
    DEFAULT_NAMESPACE,
    connect,
    is_nats_url,
    is_transient,
    nats_settings,
    redacted,
    retrying,
)

from .conftest import ROOT
from .nats_servers import free_port, start_nats

# ---------------------------------------------------------------------------------------------- URLs

PARSE = [
    # url, servers, namespace, auth
    ("nats://h", ["nats://h:4222"], DEFAULT_NAMESPACE, "none"),
    ("nats://127.0.0.1:4333", ["nats://127.0.0.1:4333"], DEFAULT_NAMESPACE, "none"),
    ("tls://nats.example.com:4222", ["tls://nats.example.com:4222"], DEFAULT_NAMESPACE, "none"),
    ("nats://a:4222,b:4223,c", ["nats://a:4222", "nats://b:4223", "nats://c:4222"], DEFAULT_NAMESPACE, "none"),
    ("nats://a:1, nats://b:2", ["nats://a:1", "nats://b:2"], DEFAULT_NAMESPACE, "none"),
    ("nats://alice:s3cret@h:4222", ["nats://h:4222"], DEFAULT_NAMESPACE, "user alice"),
    ("nats://alice:p%40ss%2Cw@a:1,b:2/team-1", ["nats://a:1", "nats://b:2"], "team-1", "user alice"),
    ("nats://TOKEN123@h:4222", ["nats://h:4222"], DEFAULT_NAMESPACE, "token"),
    ("nats://h:4222/Repo_A", ["nats://h:4222"], "Repo_A", "none"),
    ("nats://h:4222/", ["nats://h:4222"], DEFAULT_NAMESPACE, "none"),
    ("nats://h:4222?namespace=x1", ["nats://h:4222"], "x1", "none"),
    ("nats://h:4222?ns=x2&replicas=3", ["nats://h:4222"], "x2", "none"),
    ("NATS://[::1]:4222", ["nats://[::1]:4222"], DEFAULT_NAMESPACE, "none"),
]


@pytest.mark.parametrize("url,servers,namespace,auth", PARSE)
def test_parse(url, servers, namespace, auth):
    s = nats_settings(url, env={})
    assert list(s.servers) == servers
    assert s.namespace == namespace
    assert s.auth == auth
    assert is_nats_url(url)


def test_credentials_kept_secret():
    s = nats_settings("nats://alice:p%40ss%2Cw@a:1", env={})
    assert (s.user, s.password.get_secret_value()) == ("alice", "p@ss,w")
    t = nats_settings("tls://TOKEN123@h:4222", env={})
    assert t.token.get_secret_value() == "TOKEN123" and t.tls
    for text in (repr(s), str(s), s.url, repr(t), t.url, t.model_dump_json()):
        assert "p@ss" not in text and "TOKEN123" not in text
    assert s.url == "nats://a:1" and t.url == "tls://h:4222"
    assert nats_settings("nats://h:1/ns", env={}).url == "nats://h:1/ns"
    r3 = nats_settings("nats://u:p@a:1,b:2,c:3?ns=team&replicas=3", env={})
    assert (r3.replicas, r3.url) == (3, "nats://a:1,b:2,c:3/team?replicas=3")


ERRORS = [
    ("http://h:4222", "unknown scheme 'http'"),
    ("h:4222", "not a URL"),
    ("nats://", "a server is empty"),
    ("nats://a:1,,b:2", "a server is empty"),
    ("nats://h:99999", "PORT between 1 and 65535"),
    ("nats://h:port", "PORT between 1 and 65535"),
    ("nats://a:1,tls://b:2", "mixes schemes"),
    ("nats://h:4222/a.b", "namespace 'a.b'"),
    ("nats://h:4222/a/b", "namespace 'a/b'"),
    ("nats://h:4222/" + "x" * 65, "1 to 64 letters"),
    ("nats://h:4222?stream=x", "unknown option 'stream'"),
    ("nats://h:4222?replicas=0", "replicas='0': give a whole number from 1 to 5"),
    ("nats://h:4222?replicas=three", "replicas='three'"),
    ("nats://h:4222/a?namespace=b", "two different namespaces"),
    ("nats://u:@h:4222", "needs both a user and a password"),
    ("nats://u:p@a:1,v:q@b:2", "different credentials"),
    ("nats://h#frag", "fragment"),
    ("nats://u:pa/ss@h:4222", "percent-encode '/', '?' and '#'"),
]


@pytest.mark.parametrize("url,message", ERRORS)
def test_bad_urls(url, message):
    with pytest.raises(NatsConfigError) as e:
        nats_settings(url, env={})
    assert message in str(e.value)
    assert isinstance(e.value, ConfigError)


@pytest.mark.parametrize(
    "url,clean",
    [
        ("nats://alice:s3cret@h:4222", "nats://h:4222"),
        ("nats://TOKEN123@a:1,b:2/ns", "nats://a:1,b:2/ns"),
        ("nats://u:p@a:1,nats://u:p@b:2", "nats://a:1,b:2"),
        ("tls://tok@h?namespace=x", "tls://h?namespace=x"),
        ("http://user:pw@h", "http://h"),  # not ours, still cleaned
        ("nats://a:1,tls://s3cret@b", "nats://b"),  # invalid: everything up to the last @ goes
        ("nats://h:4222", "nats://h:4222"),
        ("nats://u:pa/ss@h:4222", "nats://h:4222"),  # an unencoded '/' in the password
        ("nats://u:pa?ss@h:4222", "nats://h:4222"),
        ("nats://u:pa#ss@h:4222", "nats://h:4222"),
        ("tls://se/cret@a:1,b:2", "tls://a:1,b:2"),
    ],
)
def test_redacted(url, clean):
    assert redacted(url) == clean


@pytest.mark.parametrize(
    "url",
    [
        "nats://alice:s3cret@h:4222/bad.ns",
        "nats://alice:s3/cret@h:4222",
        "nats://alice:s3cret@h:port",
        "nats://alice:s3#cret@h",
    ],
)
def test_error_messages_never_show_credentials(url):
    with pytest.raises(NatsConfigError) as e:
        nats_settings(url, env={})
    assert "s3" not in str(e.value) and "cret" not in str(e.value) and "alice" not in str(e.value), str(e.value)


def test_files_from_env_and_flags(tmp_path):
    ca, cert, key, creds, seed = (tmp_path / n for n in ("ca.pem", "c.pem", "c.key", "u.creds", "u.nk"))
    for f in (ca, cert, key, creds, seed):
        f.write_text("x")
    env = {"CC_TASKS_NATS_TLS_CA": str(ca), "CC_TASKS_NATS_CREDS": str(creds)}
    s = nats_settings("nats://h", env=env)
    assert s.tls and s.tls_ca == ca and s.creds_file == creds and s.auth == "creds"
    # a flag wins over the environment
    other = tmp_path / "other.pem"
    other.write_text("x")
    assert nats_settings("nats://h", env=env, tls_ca=other).tls_ca == other
    s = nats_settings("nats://h", env={}, nkey=seed, tls_cert=cert, tls_key=key)
    assert s.nkey_file == seed and s.tls_cert == cert and s.auth == "nkey"


@pytest.mark.parametrize(
    "kwargs,env,message",
    [
        ({"tls_ca": "/nonexistent/ca.pem"}, {}, "--nats-tls-ca='/nonexistent/ca.pem': no such file"),
        ({}, {"CC_TASKS_NATS_CREDS": "/nonexistent/u.creds"}, "CC_TASKS_NATS_CREDS='/nonexistent/u.creds': no such"),
        ({"tls_cert": "FILE"}, {}, "without its key: set CC_TASKS_NATS_TLS_KEY"),
        ({"tls_key": "FILE"}, {}, "without its certificate: set CC_TASKS_NATS_TLS_CERT"),
        ({"creds": "FILE", "nkey": "FILE"}, {}, "keep one"),
    ],
)
def test_bad_files(tmp_path, kwargs, env, message):
    f = tmp_path / "f"
    f.write_text("x")
    kwargs = {k: (str(f) if v == "FILE" else v) for k, v in kwargs.items()}
    with pytest.raises(NatsConfigError) as e:
        nats_settings("nats://h", env=env, **kwargs)
    assert message in str(e.value)


def test_creds_file_and_url_credentials_conflict(tmp_path):
    f = tmp_path / "u.creds"
    f.write_text("x")
    with pytest.raises(NatsConfigError, match="use one way to authenticate"):
        nats_settings("nats://tok@h", env={}, creds=f)


def test_not_nats_urls():
    assert not is_nats_url("/tmp/store") and not is_nats_url("file:///tmp/x") and not is_nats_url("")


def test_local_path_does_not_import_nats():
    """The local backend's processes (server, CLI, worker) never load nats-py."""
    code = (
        "import sys, cc_tasks.cli, cc_tasks.server, cc_tasks.worker, cc_tasks.http;"
        "bad = sorted(m for m in sys.modules if m == 'nats' or m.startswith('nats.') or m == 'cc_tasks.nats_conn');"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


# ----------------------------------------------------------------------------------------- retrying


async def test_retrying_rides_out_transient_errors():
    errors = [
        nats.errors.TimeoutError(),
        nats.errors.NoRespondersError(),
        nats.js.errors.NoStreamResponseError(),
        nats.js.errors.ServiceUnavailableError(code=503, err_code=10008, description="temporarily unavailable"),
        nats.js.errors.APIError(code=503, description="no leader"),
        nats.errors.ConnectionReconnectingError(),
    ]
    calls = []

    async def fn():
        calls.append(time.monotonic())
        if errors:
            raise errors.pop(0)
        return "ok"

    t = time.monotonic()
    assert await retrying(fn, what="test", deadline=10) == "ok"
    assert len(calls) == 7
    took = time.monotonic() - t
    assert 0.1 < took < 3, took  # 50 ms doubling, jittered between half and all of it


@pytest.mark.parametrize(
    "error",
    [
        nats.js.errors.KeyWrongLastSequenceError(description="wrong last sequence: 7"),
        nats.js.errors.KeyNotFoundError(),
        nats.js.errors.NotFoundError(code=404, err_code=10059, description="stream not found"),
        nats.js.errors.BadRequestError(code=400, err_code=10071, description="wrong last sequence"),
        nats.js.errors.APIError(code=500, err_code=10049, description="stream name in use with different config"),
        nats.errors.ConnectionClosedError(),
        nats.errors.AuthorizationError(),
        ValueError("not ours"),
    ],
)
async def test_retrying_lets_logical_errors_through_at_once(error):
    calls = []

    async def fn():
        calls.append(1)
        raise error

    with pytest.raises(type(error)):
        await retrying(fn, what="test")
    assert len(calls) == 1
    assert not is_transient(error)


async def test_retrying_gives_up_at_the_deadline():
    async def fn():
        raise nats.errors.TimeoutError

    t = time.monotonic()
    with pytest.raises(BackendUnreachableError, match=r"write record: NATS did not answer .*TimeoutError"):
        await retrying(fn, what="write record", deadline=0.5)
    assert 0.5 <= time.monotonic() - t < 1.5


# ------------------------------------------------------------------------------------ real servers


async def _roundtrip(nc) -> None:
    """A KV write and read: the connection works, JetStream included."""
    js = nc.jetstream(timeout=5)
    kv = await js.create_key_value(bucket=f"probe_{os.getpid()}")
    await kv.put("k", b"v")
    assert (await kv.get("k")).value == b"v"


async def test_connect_plain(nats_url):
    s = nats_settings(nats_url, env={})
    nc = await connect(s)
    try:
        assert nc.is_connected
        assert nc.max_reconnect_attempts == -1 if hasattr(nc, "max_reconnect_attempts") else True
        assert nc.options["max_reconnect_attempts"] == -1 and nc.options["allow_reconnect"]
        await _roundtrip(nc)
    finally:
        await nc.close()


async def test_token_auth(tmp_path):
    server = start_nats(tmp_path, config_text='authorization { token: "T0ken-xyz" }')
    try:
        nc = await connect(nats_settings(f"nats://T0ken-xyz@127.0.0.1:{server.port}", env={}))
        await _roundtrip(nc)
        await nc.close()
        t = time.monotonic()
        with pytest.raises(BackendUnreachableError, match="refused the credentials") as e:
            await connect(nats_settings(f"nats://wrong@127.0.0.1:{server.port}", env={}))
        assert time.monotonic() - t < 3
        assert "wrong" not in str(e.value)
        with pytest.raises(BackendUnreachableError, match="refused the credentials"):
            await connect(nats_settings(f"nats://127.0.0.1:{server.port}", env={}))  # none given
    finally:
        server.stop()


async def test_user_password(tmp_path):
    conf = 'authorization { users = [ { user: "alice", password: "p@ss,word" } ] }'
    server = start_nats(tmp_path, config_text=conf)
    try:
        nc = await connect(nats_settings(f"nats://alice:p%40ss%2Cword@127.0.0.1:{server.port}", env={}))
        await _roundtrip(nc)
        await nc.close()
        t = time.monotonic()
        with pytest.raises(BackendUnreachableError, match="refused the credentials") as e:
            await connect(nats_settings(f"nats://alice:nope@127.0.0.1:{server.port}", env={}))
        took = time.monotonic() - t
        assert took < 3, f"a wrong password took {took:.1f} s to report"
        assert "nope" not in str(e.value) and f"nats://127.0.0.1:{server.port}" in str(e.value)
    finally:
        server.stop()


async def test_nkey_seed_file(tmp_path):
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed + b"\n")
    seed_file.chmod(0o600)
    server = start_nats(tmp_path / "srv", config_text=f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}')
    try:
        nc = await connect(nats_settings(server.url, env={"CC_TASKS_NATS_NKEY": str(seed_file)}))
        await _roundtrip(nc)
        await nc.close()
    finally:
        server.stop()


def _keypair(prefix: int):
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    return seed, nkeys.from_seed(bytearray(seed))


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def _jwt(issuer, subject: str, name: str, nats_claims: dict) -> str:
    """A NATS JWT (what nsc issues): ed25519-nkey signed by ``issuer``."""
    claims = {
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": nats_claims,
    }
    digest = hashlib.new("sha512_256", json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    signed = f"{_b64(json.dumps({'typ': 'JWT', 'alg': 'ed25519-nkey'}).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


def operator_mode(d: Path) -> tuple[str, Path, Path]:
    """A server config in operator (JWT) mode with a JetStream account, a .creds file of a user of that
    account, and a .creds file of a user signed by an account the server does not know."""
    _, op = _keypair(nkeys.PREFIX_BYTE_OPERATOR)
    _, sys_acc = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    _, app = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    limits = {
        "subs": -1,
        "data": -1,
        "payload": -1,
        "imports": -1,
        "exports": -1,
        "wildcards": True,
        "conn": -1,
        "leaf": -1,
    }
    js_limits = {**limits, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    op_jwt = _jwt(
        op,
        op.public_key.decode(),
        "op",
        {"type": "operator", "version": 2, "system_account": sys_acc.public_key.decode()},
    )
    sys_jwt = _jwt(op, sys_acc.public_key.decode(), "SYS", {"limits": limits, "type": "account", "version": 2})
    app_jwt = _jwt(op, app.public_key.decode(), "app", {"limits": js_limits, "type": "account", "version": 2})
    config = (
        f'operator: "{op_jwt}"\nresolver: MEMORY\nsystem_account: {sys_acc.public_key.decode()}\n'
        f'resolver_preload: {{ {app.public_key.decode()}: "{app_jwt}", {sys_acc.public_key.decode()}: "{sys_jwt}" }}\n'
    )

    def creds(account, name: str) -> Path:
        seed, user = _keypair(nkeys.PREFIX_BYTE_USER)
        claims = {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2}
        user_jwt = _jwt(account, user.public_key.decode(), name, claims)
        path = d / f"{name}.creds"
        path.write_text(
            f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n"
        )
        path.chmod(0o600)
        return path

    _, stranger = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    return config, creds(app, "worker"), creds(stranger, "stranger")


async def test_creds_file(tmp_path):
    config, good, bad = operator_mode(tmp_path)
    server = start_nats(tmp_path / "srv", config_text=config)
    try:
        nc = await connect(nats_settings(server.url, env={"CC_TASKS_NATS_CREDS": str(good)}))
        await _roundtrip(nc)
        await nc.close()
        t = time.monotonic()
        with pytest.raises(BackendUnreachableError, match="refused the credentials"):
            await connect(nats_settings(server.url, env={}, creds=bad))
        assert time.monotonic() - t < 3
    finally:
        server.stop()


async def test_reconnects_after_a_server_restart(tmp_path):
    """A connection outlives its server's restart (same port, same store); `retrying` covers the gap."""
    server = start_nats(tmp_path / "srv")
    events = []

    async def disconnected():
        events.append("disconnected")

    async def reconnected():
        events.append("reconnected")

    nc = None
    try:
        nc = await connect(
            nats_settings(server.url + "/restart", env={}),
            error_cb=_quiet,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
        )
        js = nc.jetstream(timeout=2)
        kv = await js.create_key_value(bucket="restart_records")
        await kv.put("k", b"0")
        server.stop()
        writes = asyncio.ensure_future(retrying(lambda: kv.put("k", b"1"), what="write during restart", deadline=30))
        await asyncio.sleep(0.5)
        assert not writes.done()
        server.start()
        await asyncio.wait_for(writes, 30)
        assert (await retrying(lambda: kv.get("k"), what="read")).value == b"1"
        assert "disconnected" in events and "reconnected" in events
    finally:
        if nc is not None:
            await nc.close()
        server.stop()


async def test_nothing_listening_is_a_bounded_clear_error():
    port = free_port()
    t = time.monotonic()
    with pytest.raises(BackendUnreachableError, match=r"no server answered within 1\.5 s") as e:
        await connect(nats_settings(f"nats://127.0.0.1:{port}", env={}, connect_timeout=1.5))
    assert time.monotonic() - t < 3
    assert "nats-server runs with JetStream" in str(e.value)


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(subject: str, key, issuer_cert, issuer_key, *, ca=False, server=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        usage = x509.oid.ExtendedKeyUsageOID.SERVER_AUTH if server else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return b.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture
def pki(tmp_path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, PEM files."""
    d = tmp_path / "pki"
    d.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("cc-tasks test CA", ca_key, None, None, ca=True)
    out = {"ca": d / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who, server in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(f"cc-tasks {who}", key, ca, ca_key, server=server)
        out[f"{who}_cert"] = d / f"{who}.pem"
        out[f"{who}_key"] = d / f"{who}.key"
        out[f"{who}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{who}_key"].write_bytes(_pem_key(key))
        out[f"{who}_key"].chmod(0o600)
    other_key = ec.generate_private_key(ec.SECP256R1())
    out["other_ca"] = d / "other_ca.pem"
    out["other_ca"].write_bytes(
        _cert("another CA", other_key, None, None, ca=True).public_bytes(serialization.Encoding.PEM)
    )
    return out


def tls_server_config(pki: dict[str, Path], token: str) -> str:
    """The TLS + token server config README shows (docs/nats-readme-draft.md), with the test's files."""
    return (
        "tls {\n"
        f'  cert_file: "{pki["server_cert"]}"\n'
        f'  key_file:  "{pki["server_key"]}"\n'
        f'  ca_file:   "{pki["ca"]}"\n'
        "  verify:    true\n"
        "  timeout:   2\n"
        "}\n"
        f'authorization {{ token: "{token}" }}\n'
    )


async def test_tls_with_client_certificates(tmp_path, pki):
    server = start_nats(tmp_path / "srv", config_text=tls_server_config(pki, "tls-T0ken"))
    url = f"tls://tls-T0ken@127.0.0.1:{server.port}/secure"
    env = {
        "CC_TASKS_NATS_TLS_CA": str(pki["ca"]),
        "CC_TASKS_NATS_TLS_CERT": str(pki["client_cert"]),
        "CC_TASKS_NATS_TLS_KEY": str(pki["client_key"]),
    }
    try:
        nc = await connect(nats_settings(url, env=env))
        assert nc.is_connected
        await _roundtrip(nc)
        await nc.close()

        # verify on: no client certificate, no entry
        no_cert = {"CC_TASKS_NATS_TLS_CA": str(pki["ca"])}
        t = time.monotonic()
        with pytest.raises(BackendUnreachableError, match=r"at tls://127.0.0.1:\d+/secure: TLS failed .*certificate"):
            await connect(nats_settings(url, env=no_cert, connect_timeout=4))
        assert time.monotonic() - t < 5

        # a server certificate from a CA the client does not trust
        wrong_ca = dict(env, CC_TASKS_NATS_TLS_CA=str(pki["other_ca"]))
        t = time.monotonic()
        with pytest.raises(BackendUnreachableError, match="TLS verification failed") as e:
            await connect(nats_settings(url, env=wrong_ca))
        assert time.monotonic() - t < 3
        assert "CC_TASKS_NATS_TLS_CA" in str(e.value) and "tls-T0ken" not in str(e.value)

        # plain nats:// against a TLS-only server: nats-py upgrades, and without the CA cannot verify
        with pytest.raises(BackendUnreachableError, match="TLS verification failed"):
            await connect(nats_settings(f"nats://tls-T0ken@127.0.0.1:{server.port}", env={}, connect_timeout=3))
    finally:
        server.stop()


# --------------------------------------------------------------------------------------- a cluster


async def _stream_leader(js, stream: str) -> str:
    async def info():
        return await js.stream_info(stream)

    si = await retrying(info, what="stream info", deadline=20)
    return si.cluster.leader


async def test_cluster_leader_kill_compare_and_set_exactly_once(nats_cluster):
    """Four writers increment one R3 KV key by compare-and-set through `retrying` while the node that
    leads the stream (and, when it can be arranged, the JetStream meta group) is SIGKILLed: every
    update lands exactly once, none is lost; the pause is measured."""
    settings = nats_settings(nats_cluster.url + "/clustertest", env={})
    nc = await connect(settings, error_cb=_quiet)
    js = nc.jetstream(timeout=2)
    bucket = f"{settings.namespace}_records"
    kv = await js.create_key_value(bucket=bucket, replicas=3, history=1)
    stream = f"KV_{bucket}"
    await kv.put("counter", json.dumps({"n": 0, "ops": []}).encode())

    # Put the stream's leader on the meta leader so one kill costs both elections (bounded attempts).
    meta = nats_cluster.meta_leader()
    leader = await _stream_leader(js, stream)
    for _ in range(8):
        if leader == meta:
            break
        await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", b"", timeout=2)
        for _ in range(50):
            await asyncio.sleep(0.1)
            new = await _stream_leader(js, stream)
            if new and new != leader:
                leader = new
                break

    writers, per_writer = 4, 40
    kinds: Counter[str] = Counter()
    conflicts = 0
    landed_before_answer = 0
    done_ops = 0
    write_times: list[float] = []

    def counted(fn):
        async def call():
            try:
                return await fn()
            except Exception as e:
                kinds[
                    type(e).__name__ + (f"({getattr(e, 'err_code', '')})" if getattr(e, "err_code", None) else "")
                ] += 1
                raise

        return call

    async def writer(w: int) -> None:
        nonlocal conflicts, landed_before_answer, done_ops
        for k in range(per_writer):
            op = f"w{w}-{k}"
            while True:
                entry = await retrying(counted(lambda: kv.get("counter")), what="read counter")
                doc = json.loads(entry.value)
                if op in doc["ops"]:
                    landed_before_answer += 1  # an earlier attempt landed, its answer was lost
                    break
                doc["n"] += 1
                doc["ops"].append(op)
                value, rev = json.dumps(doc).encode(), entry.revision
                try:
                    await retrying(
                        counted(lambda value=value, rev=rev: kv.update("counter", value, last=rev)),
                        what="write counter",
                    )
                    break
                except nats.js.errors.KeyWrongLastSequenceError:
                    conflicts += 1
            done_ops += 1
            write_times.append(time.monotonic())

    tasks = [asyncio.create_task(writer(w)) for w in range(writers)]
    while done_ops < writers * per_writer // 4:
        await asyncio.sleep(0.01)
    victim = nats_cluster.by_name(leader)
    was_meta = leader == nats_cluster.meta_leader()
    killed_at, killed_wall = time.monotonic(), datetime.datetime.now()
    victim.kill()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=90)
    after = sorted(t for t in write_times if t > killed_at)
    before = [t for t in write_times if t <= killed_at]
    times = sorted(write_times)
    stall = max((b - max(a, killed_at) for a, b in zip(times, times[1:]) if b > killed_at), default=float("nan"))
    done_at = times[-1]

    final = json.loads((await retrying(lambda: kv.get("counter"), what="read counter")).value)
    new_leader = await _stream_leader(js, stream)
    await nc.close()

    ops = final["ops"]
    assert final["n"] == writers * per_writer == len(ops), (final["n"], len(ops))
    assert len(set(ops)) == len(ops), "an update was applied twice"
    assert set(ops) == {f"w{w}-{k}" for w in range(writers) for k in range(per_writer)}, "an update was lost"
    assert new_leader and new_leader != leader
    report = {
        "meta_election_s": _logged_after(nats_cluster, killed_wall, "JetStream cluster new metadata leader"),
        "stream_election_s": _logged_after(nats_cluster, killed_wall, f"new stream leader for '$G > {stream}'"),
        "killed": leader,
        "killed_was_meta_leader": was_meta,
        "new_stream_leader": new_leader,
        "writes_before_kill": len(before),
        "writes_after_kill": len(after),
        "longest_pause_after_kill_s": round(stall, 3),
        "kill_to_last_write_s": round(done_at - killed_at, 3),
        "cas_conflicts": conflicts,
        "landed_but_answer_lost": landed_before_answer,
        "errors_seen": dict(kinds),
    }
    print("\nNATS cluster leader kill:", json.dumps(report))
    (Path(os.environ.get("CC_TASKS_NATS_REPORT", "/dev/null"))).write_text(json.dumps(report) + "\n")
    assert stall < 20, report


def _logged_after(cluster, since: datetime.datetime, text: str) -> float | None:
    """Seconds from ``since`` to the first line of a running node's log containing ``text`` (the servers
    log local time to the microsecond)."""
    found = []
    for s in cluster.servers:
        if not s.running:
            continue
        for line in s.tail(10**7).splitlines():
            if text in line:
                at = datetime.datetime.strptime(" ".join(line.split()[1:3]), "%Y/%m/%d %H:%M:%S.%f")
                if at > since:
                    found.append((at - since).total_seconds())
    return round(min(found), 3) if found else None


async def _quiet(e: Exception) -> None:
    pass


def test_backend_urls_are_shown_without_credentials_and_recognised_in_any_case(tmp_path):
    from cc_tasks.connect import is_remote, open_backend, shown

    assert shown("nats://user:pa/ss@h:4222") == "nats://h:4222"  # (an unencoded '/' in the password)
    assert shown("nats://user:s3cret@h:4222/ns") == "nats://h:4222/ns"
    assert shown("NATS://user:s3cret@h") == "nats://h"
    assert shown("http://user:s3cret@h/x") == "http://h/x"
    assert shown(str(tmp_path)) == str(tmp_path)
    assert is_remote("NATS://user:s3cret@h") and is_remote(" Tls://h") and not is_remote(str(tmp_path))
    for url in ("http://user:s3cret@h", "file:///tmp/x", "natss://u:s3cret@h"):
        with pytest.raises(ConfigError) as e:
            open_backend(url)
        assert "s3cret" not in str(e.value) and "nats://HOST:PORT" in str(e.value)
    assert not (Path.cwd() / "NATS:").exists()
