"""TLS for agents on other machines: the daemon serves it, every client speaks it.

Each test makes its own certificates (a CA for the daemon, one for its clients,
and a stranger's), for 127.0.0.1 and localhost, with `cryptography`.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import sys
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from legato.client import AsyncClient, Client, Task, TaskStatus
from legato.client.cli.daemon import doctor
from legato.client.errors import UnavailableError
from legato.client.mcp_bridge import build_server
from legato.server.daemon import Config, Daemon, listen_warning
from legato.server.ops import OK
from legato.server.tls import ServerTLS
from mcp_harness import mcp_client

LEGATO = Path(sys.executable).with_name("legato")
START_TIMEOUT = 15.0
GUARD = 30.0

# -- certificates -----------------------------------------------------------------------


@dataclass(frozen=True)
class Issuer:
    """A CA: its certificate file, and what it signs with."""

    cert: Path
    name: x509.Name
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, mode: int = 0o600) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    path.chmod(mode)


def _builder(subject: x509.Name, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def make_ca(directory: Path, common_name: str) -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        _builder(name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{common_name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Issuer(path, name, key)


def issue(issuer: Issuer, directory: Path, common_name: str, *, server: bool) -> Pair:
    """A certificate signed by `issuer`: for a server on 127.0.0.1 and localhost, or for a
    client; its key is written 0600."""
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]),
            issuer.name,
            key.public_key(),
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer.key, hashes.SHA256())
    pair = Pair(directory / f"{common_name}.pem", directory / f"{common_name}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(pair.key, key)
    return pair


@dataclass(frozen=True)
class PKI:
    directory: Path
    server_ca: Issuer  # signed the daemon's certificate: clients trust it
    client_ca: Issuer  # signs the agents' certificates, for mutual TLS
    server: Pair
    client: Pair  # signed by client_ca
    stranger: Pair  # signed by a CA nobody trusts
    stranger_ca: Issuer


@pytest.fixture
def pki(short_tmp: Path) -> PKI:
    directory = short_tmp / "pki"
    directory.mkdir()
    server_ca, client_ca = make_ca(directory, "server-ca"), make_ca(directory, "client-ca")
    stranger_ca = make_ca(directory, "stranger-ca")
    return PKI(
        directory=directory,
        server_ca=server_ca,
        client_ca=client_ca,
        server=issue(server_ca, directory, "daemon", server=True),
        client=issue(client_ca, directory, "agent", server=False),
        stranger=issue(stranger_ca, directory, "stranger", server=False),
        stranger_ca=stranger_ca,
    )


# -- daemons ----------------------------------------------------------------------------

ServeTLS = Callable[..., Awaitable[Daemon]]


@pytest.fixture
async def serve_tls(short_tmp: Path, pki: PKI) -> AsyncIterator[ServeTLS]:
    """`await serve_tls()` starts an in-process daemon serving TLS on 127.0.0.1:0;
    `mutual=True` also requires client certificates signed by the client CA."""
    started: list[Daemon] = []

    async def start(*, mutual: bool = False) -> Daemon:
        tls = ServerTLS(pki.server.cert, pki.server.key, pki.client_ca.cert if mutual else None)
        config = Config(
            data_dir=short_tmp / f"data-{len(started)}", listen="127.0.0.1:0", grace=1.0, tls=tls
        )
        daemon = Daemon(config)
        await daemon.start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        await daemon.stop()


def admin_key(daemon: Daemon) -> str:
    return daemon.admin_key_path.read_text().strip()


async def delegate_once(address: str, key: str, **tls: Any) -> Task:
    """The whole story over `address`: the admin makes a coder and a researcher; the
    coder creates a task, the researcher claims and completes it, the coder gets the
    result."""
    async with AsyncClient(address, api_key=key, timeout=10, **tls) as admin:
        _, coder_key = await admin.create_agent("coder", labels=["@coder"])
        _, researcher_key = await admin.create_agent("researcher", labels=["@researcher"])
    async with (
        AsyncClient(address, api_key=coder_key, timeout=10, **tls) as coder,
        AsyncClient(address, api_key=researcher_key, timeout=10, **tls) as researcher,
    ):
        handle = await coder.create_task("current RPM for Tier 1?", labels=["@researcher"])
        job = await researcher.claim(["@researcher"])
        assert job is not None and job.id == handle.id
        await job.complete({"rpm": 500, "source": "docs"})
        return await handle.result(timeout=10)


# -- clients ----------------------------------------------------------------------------


async def test_async_client_trusting_the_ca_delegates_over_tls(
    serve_tls: ServeTLS, pki: PKI
) -> None:
    daemon = await serve_tls()

    task = await delegate_once(daemon.address, admin_key(daemon), tls_ca=pki.server_ca.cert)

    assert task.status is TaskStatus.DONE and task.result == {"rpm": 500, "source": "docs"}
    assert (task.created_by, task.claimed_by) == ("coder", "researcher")


async def test_sync_client_trusting_the_ca_delegates_over_tls(
    serve_tls: ServeTLS, pki: PKI
) -> None:
    daemon = await serve_tls()
    async with AsyncClient(
        daemon.address, api_key=admin_key(daemon), tls_ca=pki.server_ca.cert
    ) as admin:
        _, coder_key = await admin.create_agent("coder", labels=["@coder"])
        _, researcher_key = await admin.create_agent("researcher", labels=["@researcher"])

    # Blocking calls run in a thread: on the loop they would block the daemon they call.
    def story() -> Task:
        ca = str(pki.server_ca.cert)
        with (
            Client.connect(daemon.address, api_key=coder_key, tls_ca=ca) as coder,
            Client.connect(daemon.address, api_key=researcher_key, tls_ca=ca) as researcher,
        ):
            handle = coder.create_task("current RPM for Tier 1?", labels=["@researcher"])
            job = researcher.claim(["@researcher"])
            assert job is not None and job.id == handle.id
            job.complete({"rpm": 500, "source": "docs"})
            return handle.result(timeout=10)

    task = await asyncio.to_thread(story)

    assert task.status is TaskStatus.DONE and task.result == {"rpm": 500, "source": "docs"}


Face = type[AsyncClient] | type[Client]
FACES = pytest.mark.parametrize("face", [AsyncClient, Client], ids=["async", "sync"])


async def connect(face: Face, address: str, **options: Any) -> None:
    """Connects with the async or the blocking client (in a thread), then closes."""
    if face is AsyncClient:
        client = await AsyncClient.connect(address, **options)
        await client.aclose()
    else:
        blocking = await asyncio.to_thread(Client.connect, address, **options)
        blocking.close()


@FACES
async def test_a_client_that_does_not_trust_the_daemons_ca_is_refused(
    serve_tls: ServeTLS, pki: PKI, face: Face
) -> None:
    daemon = await serve_tls()

    with pytest.raises(UnavailableError) as refused:
        await connect(face, daemon.address, api_key=admin_key(daemon), tls_ca=pki.stranger_ca.cert)

    message = str(refused.value)
    assert "CERTIFICATE_VERIFY_FAILED" in message  # what gRPC saw
    assert "TLS certificate was not accepted" in message and "LEGATO_TLS_CA" in message


@FACES
async def test_a_plaintext_client_to_a_tls_port_is_told_to_use_tls(
    serve_tls: ServeTLS, face: Face
) -> None:
    daemon = await serve_tls()

    with pytest.raises(UnavailableError) as refused:
        await connect(face, daemon.address, api_key=admin_key(daemon))

    message = str(refused.value)
    assert "plaintext" in message and "serves TLS" in message
    assert "--tls-ca" in message and "LEGATO_TLS_CA" in message


def test_nobody_listening_is_not_blamed_on_tls(pki: PKI) -> None:
    with pytest.raises(UnavailableError) as refused:
        Client.connect("127.0.0.1:1", api_key="lgt_x", tls_ca=pki.server_ca.cert)

    assert "Connection refused" in str(refused.value)
    assert "TLS" not in str(refused.value)


@FACES
async def test_mutual_tls_refuses_a_client_without_a_certificate(
    serve_tls: ServeTLS, pki: PKI, face: Face
) -> None:
    daemon = await serve_tls(mutual=True)

    with pytest.raises(UnavailableError) as refused:
        await connect(face, daemon.address, api_key=admin_key(daemon), tls_ca=pki.server_ca.cert)

    message = str(refused.value)
    assert "requires client certificates" in message
    assert "--tls-cert" in message and "LEGATO_TLS_KEY" in message


async def test_mutual_tls_refuses_a_certificate_another_ca_signed(
    serve_tls: ServeTLS, pki: PKI
) -> None:
    daemon = await serve_tls(mutual=True)

    with pytest.raises(UnavailableError) as refused:
        await AsyncClient.connect(
            daemon.address,
            api_key=admin_key(daemon),
            tls_ca=pki.server_ca.cert,
            tls_cert=pki.stranger.cert,
            tls_key=pki.stranger.key,
        )

    assert f"refused {pki.stranger.cert}" in str(refused.value)
    assert "--tls-client-ca" in str(refused.value)


async def test_mutual_tls_accepts_a_certificate_the_client_ca_signed(
    serve_tls: ServeTLS, pki: PKI
) -> None:
    daemon = await serve_tls(mutual=True)

    task = await delegate_once(
        daemon.address,
        admin_key(daemon),
        tls_ca=pki.server_ca.cert,
        tls_cert=pki.client.cert,
        tls_key=pki.client.key,
    )

    assert task.status is TaskStatus.DONE and task.result == {"rpm": 500, "source": "docs"}


async def test_the_api_key_still_decides_who_the_caller_is(serve_tls: ServeTLS, pki: PKI) -> None:
    """A certificate opens the connection; the key in each call's metadata names the agent."""
    daemon = await serve_tls(mutual=True)
    tls: dict[str, Any] = {
        "tls_ca": pki.server_ca.cert,
        "tls_cert": pki.client.cert,
        "tls_key": pki.client.key,
    }
    async with AsyncClient(daemon.address, api_key=admin_key(daemon), **tls) as admin:
        _, key = await admin.create_agent("coder", labels=["@coder"])
        assert (await admin.whoami()).name == "admin"
    async with AsyncClient(daemon.address, api_key=key, **tls) as coder:
        assert (await coder.whoami()).name == "coder"


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unix socket", "is a unix socket"),
        ("certificate without key", "give both tls_cert= and tls_key="),
        ("key readable by others", "chmod 600"),
        ("key as the CA", "holds no PEM certificate"),
        ("missing CA", "cannot read the TLS CA certificate"),
    ],
)
@FACES
def test_a_client_refuses_tls_settings_it_cannot_use(
    pki: PKI, face: Face, case: str, expected: str
) -> None:
    ca = pki.server_ca.cert
    settings: dict[str, dict[str, Any]] = {
        "unix socket": {"tls_ca": ca},
        "certificate without key": {"tls_ca": ca, "tls_cert": pki.client.cert},
        "key readable by others": {"tls_cert": pki.client.cert, "tls_key": pki.client.key},
        "key as the CA": {"tls_ca": pki.client.key},
        "missing CA": {"tls_ca": pki.directory / "missing.pem"},
    }
    address = "unix:/tmp/legato.sock" if case == "unix socket" else "127.0.0.1:7443"
    if case == "key readable by others":
        pki.client.key.chmod(0o644)

    with pytest.raises(ValueError, match=r"TLS|tls") as refused:
        face(address, api_key="lgt_x", **settings[case])

    assert expected in str(refused.value)


def test_tls_settings_come_from_the_environment(pki: PKI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEGATO_TLS_CA", str(pki.server_ca.cert))
    monkeypatch.setenv("LEGATO_TLS_CERT", str(pki.client.cert))
    monkeypatch.setenv("LEGATO_TLS_KEY", str(pki.client.key))
    with Client("127.0.0.1:7443", api_key="lgt_x") as client:
        assert client.tls is not None
        assert (client.tls.ca, client.tls.cert, client.tls.key) == (
            pki.server_ca.cert,
            pki.client.cert,
            pki.client.key,
        )
    monkeypatch.delenv("LEGATO_TLS_CERT")
    monkeypatch.delenv("LEGATO_TLS_KEY")
    # An explicit empty value is no file: plaintext, whatever the environment says.
    with Client("127.0.0.1:7443", api_key="lgt_x", tls_ca="") as client:
        assert client.tls is None


# -- legato serve and the CLI -----------------------------------------------------------


@dataclass
class Served:
    process: asyncio.subprocess.Process
    address: str  # from the ready line, 0.0.0.0 replaced by 127.0.0.1 to connect to
    ready_line: str
    stderr_before_ready: str
    data_dir: Path

    @property
    def admin_key(self) -> str:
        return (self.data_dir / "admin.key").read_text().strip()


Serve = Callable[..., Awaitable[Served]]


def clean_env() -> dict[str, str]:
    unset = ("LEGATO_AGENT_KEY", "LEGATO_DATA_DIR", "LEGATO_ADDRESS")
    return {
        k: v for k, v in os.environ.items() if k not in unset and not k.startswith("LEGATO_TLS")
    }


@pytest.fixture
async def serve(short_tmp: Path) -> AsyncIterator[Serve]:
    """`await serve("--listen", ...)` runs `legato serve` and returns once it serves."""
    processes: list[asyncio.subprocess.Process] = []

    async def start(*args: str) -> Served:
        data_dir = short_tmp / f"served-{len(processes)}"
        stderr_path = short_tmp / f"served-{len(processes)}.log"
        with stderr_path.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                str(LEGATO), "serve", "--data-dir", str(data_dir), "--grace", "1", *args,
                env=clean_env(), stdout=asyncio.subprocess.PIPE, stderr=stderr,
            )  # fmt: skip
        processes.append(process)
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT)).decode()
        before_ready = stderr_path.read_text()  # the warning comes before the ready line
        assert line.startswith("legato serving on "), f"{line!r}\n{before_ready}"
        address = line.removeprefix("legato serving on ").split(" ", 1)[0]
        return Served(
            process, address.replace("0.0.0.0", "127.0.0.1", 1), line, before_ready, data_dir
        )

    yield start
    for process in processes:
        if process.returncode is None:
            process.kill()
            await process.wait()


@dataclass(frozen=True)
class Ran:
    code: int
    stdout: str
    stderr: str


async def legato(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Ran:
    process = await asyncio.create_subprocess_exec(
        str(LEGATO), *args, env={**clean_env(), **(env or {})}, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), GUARD)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Ran(process.returncode, stdout.decode(), stderr.decode())


def tls_args(pki: PKI, *, mutual: bool = False) -> list[str]:
    args = ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)]
    return args + (["--tls-client-ca", str(pki.client_ca.cert)] if mutual else [])


async def test_the_cli_delegates_over_tls_to_legato_serve(serve: Serve, pki: PKI) -> None:
    served = await serve("--listen", "127.0.0.1:0", *tls_args(pki))
    assert "TLS" in served.ready_line
    # The CA by flag for some commands, by LEGATO_TLS_CA for others: both work.
    ca = ["--tls-ca", str(pki.server_ca.cert)]
    by_env = {"LEGATO_ADDRESS": served.address, "LEGATO_TLS_CA": str(pki.server_ca.cert)}
    admin = {"LEGATO_AGENT_KEY": served.admin_key}

    added = await legato("agent", "add", "coder", "-l", "@coder", "--json", env=by_env | admin)
    assert added.code == 0, added.stderr
    coder = json.loads(added.stdout)["api_key"]
    added = await legato(
        "agent", "add", "researcher", "-l", "@researcher", "--json",
        "--address", served.address, *ca, "--key", served.admin_key,
    )  # fmt: skip
    assert added.code == 0, added.stderr
    researcher = json.loads(added.stdout)["api_key"]

    created = await legato(
        "task", "create", "current RPM for Tier 1?", "-l", "@researcher",
        env=by_env | {"LEGATO_AGENT_KEY": coder},
    )  # fmt: skip
    assert created.code == 0, created.stderr
    task_id = created.stdout.strip()
    claimed = await legato(
        "task", "claim", "--json", "--address", served.address, *ca, "--key", researcher
    )
    assert claimed.code == 0, claimed.stderr
    claim = json.loads(claimed.stdout)
    assert claim["task"]["id"] == task_id
    completed = await legato(
        "task", "complete", task_id, "--token", claim["lease_token"],
        "--result", '{"rpm": 500, "source": "docs"}',
        "--address", served.address, *ca, "--key", researcher,
    )  # fmt: skip
    assert completed.code == 0, completed.stderr
    got = await legato("task", "get", task_id, "--json", env=by_env | {"LEGATO_AGENT_KEY": coder})
    assert got.code == 0, got.stderr
    task = json.loads(got.stdout)
    assert (task["status"], task["result"]) == ("done", {"rpm": 500, "source": "docs"})

    plaintext = await legato("task", "list", "--address", served.address, "--key", coder)
    assert plaintext.code == 1 and plaintext.stdout == ""
    assert "serves TLS" in plaintext.stderr and "--tls-ca" in plaintext.stderr


async def test_the_cli_with_a_client_certificate_reaches_a_mutual_tls_daemon(
    serve: Serve, pki: PKI
) -> None:
    served = await serve("--listen", "127.0.0.1:0", *tls_args(pki, mutual=True))
    assert "TLS with client certificates" in served.ready_line
    env = {
        "LEGATO_ADDRESS": served.address,
        "LEGATO_AGENT_KEY": served.admin_key,
        "LEGATO_TLS_CA": str(pki.server_ca.cert),
    }

    with_cert = await legato(
        "agent", "whoami", "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key),
        env=env,
    )  # fmt: skip
    without = await legato("agent", "whoami", env=env)

    assert with_cert.code == 0, with_cert.stderr
    assert with_cert.stdout.split()[0] == "admin"
    assert without.code == 1 and without.stdout == ""
    assert "requires client certificates" in without.stderr


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plaintext"])
async def test_serving_beyond_loopback_warns_only_without_tls(
    serve: Serve, pki: PKI, tls: bool
) -> None:
    served = await serve("--listen", "0.0.0.0:0", *(tls_args(pki) if tls else []))

    warned = "WARNING" in served.stderr_before_ready
    assert warned is not tls, served.stderr_before_ready
    if not tls:
        assert "without TLS" in served.stderr_before_ready
        assert "--tls-cert FILE --tls-key FILE" in served.stderr_before_ready
    ca = pki.server_ca.cert if tls else None
    async with AsyncClient(served.address, api_key=served.admin_key, tls_ca=ca) as admin:
        assert (await admin.whoami()).name == "admin"


def test_listen_warning_is_none_with_tls() -> None:
    for address in ("0.0.0.0:7443", "[::]:7443", "devbox.example:7443"):
        assert listen_warning(address) is not None
        assert listen_warning(address, tls=True) is None


def _encrypted_key(pki: PKI) -> Path:
    key = serialization.load_pem_private_key(pki.server.key.read_bytes(), password=None)
    path = pki.directory / "encrypted.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing certificate", "cannot read the TLS certificate"),
        ("key is a directory", "cannot read the TLS key"),
        ("key of another certificate", "does not belong to the certificate"),
        ("key readable by others", "can be read by other users (mode 0644)"),
        ("certificate and key swapped", "are the certificate and the key swapped?"),
        ("key with a passphrase", "protected by a passphrase"),
        ("client CA is no certificate", "the TLS client CA"),
        ("unix socket", "is a unix socket"),
        ("certificate without key", "--tls-cert FILE --tls-key FILE"),
        ("client CA alone", "--tls-client-ca adds client certificates"),
    ],
)
async def test_serve_refuses_tls_files_it_cannot_use_in_one_line(
    short_tmp: Path, pki: PKI, case: str, expected: str
) -> None:
    cert, key = str(pki.server.cert), str(pki.server.key)
    listen = ["--listen", "127.0.0.1:0"]
    args = {
        "missing certificate": ["--tls-cert", str(pki.directory / "nope.pem"), "--tls-key", key],
        "key is a directory": ["--tls-cert", cert, "--tls-key", str(pki.directory)],
        "key of another certificate": ["--tls-cert", cert, "--tls-key", str(pki.client.key)],
        "key readable by others": ["--tls-cert", cert, "--tls-key", key],
        "certificate and key swapped": ["--tls-cert", key, "--tls-key", cert],
        "key with a passphrase": ["--tls-cert", cert, "--tls-key", str(_encrypted_key(pki))],
        "client CA is no certificate": [
            "--tls-cert", cert, "--tls-key", key, "--tls-client-ca", str(pki.client.key),
        ],
        "unix socket": ["--tls-cert", cert, "--tls-key", key],
        "certificate without key": ["--tls-cert", cert],
        "client CA alone": ["--tls-client-ca", str(pki.client_ca.cert)],
    }[case]  # fmt: skip
    if case == "key readable by others":
        pki.server.key.chmod(0o644)
    if case == "unix socket":
        listen = ["--listen", f"unix:{short_tmp}/run/legato.sock"]

    ran = await legato("serve", "--data-dir", str(short_tmp / "data"), *listen, *args)

    assert (ran.code, ran.stdout) == (1, ""), ran.stderr
    [line] = ran.stderr.splitlines()
    assert line.startswith("legato: ") and expected in line, line


# -- MCP --------------------------------------------------------------------------------


async def test_mcp_config_for_a_remote_daemon_carries_its_address_and_ca(
    serve_tls: ServeTLS, pki: PKI
) -> None:
    daemon = await serve_tls()
    remote = ["--address", daemon.address, "--tls-ca", pki.server_ca.cert.name]
    # Relative to where the command runs; the snippet must work from anywhere.
    # The key files go to this machine's data dir, never into the snippet.
    admin = {"LEGATO_AGENT_KEY": admin_key(daemon), "LEGATO_DATA_DIR": str(pki.directory / "d")}

    codex = await legato(
        "mcp", "config", "--client", "codex", "--agent", "coder", *remote,
        env=admin, cwd=pki.directory,
    )  # fmt: skip
    claude = await legato(
        "mcp", "config", "--client", "claude", "--agent", "researcher", *remote,
        env=admin, cwd=pki.directory,
    )  # fmt: skip

    assert codex.code == 0, codex.stderr
    assert claude.code == 0, claude.stderr
    codex_env = tomllib.loads(codex.stdout)["mcp_servers"]["legato"]["env"]
    claude_env = json.loads(claude.stdout)["mcpServers"]["legato"]["env"]
    for env, name in ((codex_env, "coder"), (claude_env, "researcher")):
        assert env["LEGATO_ADDRESS"] == daemon.address
        assert env["LEGATO_TLS_CA"] == str(pki.server_ca.cert)
        assert set(env) == {"LEGATO_ADDRESS", "LEGATO_TLS_CA", "LEGATO_DATA_DIR"}
        # The bridge builds its client from this env and the agent's key file alone.
        key = (Path(env["LEGATO_DATA_DIR"]) / "keys" / f"{name}.key").read_text().strip()
        async with AsyncClient(
            env["LEGATO_ADDRESS"], api_key=key, tls_ca=env["LEGATO_TLS_CA"]
        ) as agent:
            assert (await agent.whoami()).name == name
    for ran in (codex, claude):
        assert "BEGIN" not in ran.stdout  # paths to the files, never their contents


async def test_the_mcp_bridge_reaches_a_tls_daemon_through_legato_tls_ca(
    serve_tls: ServeTLS, pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = await serve_tls()
    async with AsyncClient(
        daemon.address, api_key=admin_key(daemon), tls_ca=pki.server_ca.cert
    ) as admin:
        _, key = await admin.create_agent("coder", labels=["@coder"])
    monkeypatch.setenv("LEGATO_TLS_CA", str(pki.server_ca.cert))

    async with mcp_client(build_server(address=daemon.address, api_key=key)) as coder:
        result = await asyncio.wait_for(
            coder.call_tool("delegate_task", {"label": "@coder", "request": "RPM?"}), GUARD
        )

    assert not result.is_error, result.content
    assert isinstance(result.structured_content, dict)
    assert result.structured_content["status"] == "pending"


# -- doctor -----------------------------------------------------------------------------


async def test_doctor_checks_the_tls_files_and_asks_the_daemon_over_tls(
    serve_tls: ServeTLS, pki: PKI
) -> None:
    daemon = await serve_tls(mutual=True)
    data_dir, address = daemon.config.data_dir, daemon.address
    mine = {"tls_ca": pki.server_ca.cert, "tls_cert": pki.client.cert, "tls_key": pki.client.key}

    good = await asyncio.to_thread(doctor, data_dir=data_dir, address=address, **mine)
    pki.client.key.chmod(0o640)
    loose = await asyncio.to_thread(doctor, data_dir=data_dir, address=address, **mine)
    plaintext = await asyncio.to_thread(doctor, data_dir=data_dir, address=address, tls_ca="")

    assert all(check.status == OK for check in good), [c.line() for c in good]
    checks = {check.name: check for check in good}
    assert "client certificate" in checks["tls"].detail and "SERVING" in checks["health"].detail
    assert "admin" in checks["admin.key"].detail
    checks = {check.name: check for check in loose}
    assert checks["tls"].status == "FAIL" and "chmod 600" in checks["tls"].detail
    assert checks["health"].status == "FAIL"
    checks = {check.name: check for check in plaintext}
    assert "tls" not in checks
    assert checks["health"].status == "FAIL" and "--tls-ca" in checks["health"].fix
