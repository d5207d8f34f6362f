"""Real Flower deployments on loopback (flwr 1.41 and 1.42): a SuperLink, SuperNodes and
``flwr run``, each a separate OS process, as an operator would start them.

* TLS: a CA and a server certificate made at test time; SuperNodes and ``flwr run`` trust
  the CA, a SuperNode without it is refused (certificate verify failed); one FedUGM round
  over the three SuperNodes, recorded under their node-config client ids;
* node auth: ``--enable-supernode-auth`` (needs TLS); SuperNode keys registered with
  ``flwr supernode register``; an unregistered key is refused;
* crash: ``flower-superlink --insecure`` + three SuperNodes; the ServerApp killed mid-run,
  a client removed offline, the run resumed;
* the quickstart example (``examples/quickstart-pytorch``) on a simulation SuperLink:
  train, remove a client, resume.

Every process gets a private ``FLWR_HOME`` and a unique environment tag. Flower starts more
processes of its own (``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``), some in
new sessions, which inherit the tag; teardown stops everything carrying the tag by PID and
asserts that nothing is left. Ports are picked free at run time. Linux only (``/proc``).

Run with ``python -m pytest -m deployment tests/test_deployment.py`` (about 7 min on 2 cores).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from simulations.flower_app import history_path

pytestmark = [
    pytest.mark.deployment,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux /proc"),
]

ROOT = Path(__file__).resolve().parent.parent
TAG_VAR = "FL_UGM_DEPLOYMENT_TEST_TAG"
CONNECTION = "deployment-test"  # the SuperLink connection's name in $FLWR_HOME/config.toml
NODE_ID = re.compile(r"SuperNode ID: (\d+)")
FEDUGM_RECORDS = ["client", "delta", "fisher", "metrics", "ugm-scales"]
#: the small task every run uses (scikit-learn digits, offline); the app's other keys keep
#: their pyproject.toml defaults
RUN_CONFIG = {"task": "digits", "num-clients": 3, "test-examples": 400, "strategy": "fedugm"}


# ---------------------------------------------------------------------------------------
# processes


def executable(name: str) -> str:
    """A Flower console script: next to this interpreter (skips pyenv shims), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free on 127.0.0.1 right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tagged_pids(tag: str) -> list[int]:
    """Live processes (not zombies) whose environment carries ``TAG_VAR=tag``."""
    needle = f"{TAG_VAR}={tag}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if needle in Path(entry.path, "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def describe(pids: Sequence[int]) -> str:
    lines = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            cmd = "?"
        lines.append(f"{pid}: {cmd.strip()}")
    return "\n".join(lines)


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    """Poll ``condition`` until it returns something truthy (returned) or ``timeout`` s pass
    (returns the last falsy value)."""
    deadline = time.monotonic() + timeout
    while not (result := condition()) and time.monotonic() < deadline:
        time.sleep(interval)
    return result


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 40) -> str:
        return f"--- {self.name} (rc={self.popen.poll()}) {self.log}\n" + "\n".join(
            self.output().splitlines()[-lines:]
        )

    def wait_for_output(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """The first match of ``pattern`` in the log; fails if the process exits first."""
        match = wait_until(
            lambda: pattern.search(self.output()) or self.popen.poll() is not None, timeout
        )
        match = pattern.search(self.output())  # it may have printed it just before exiting
        assert match, f"{self.name}: no {pattern.pattern!r} within {timeout} s\n{self.tail()}"
        return match


class Deployment:
    """Starts Flower processes with a private FLWR_HOME and a unique tag; stops them all."""

    def __init__(self, base: Path):
        self.base = base
        self.home = base / "flwr-home"
        self.logs = base / "logs"
        self.home.mkdir(parents=True)
        self.logs.mkdir()
        self.tag = uuid.uuid4().hex
        self.processes: list[Process] = []
        self.superlink_address = ""
        self.env = {
            **os.environ,
            # the SuperLink starts flower-superexec through PATH: this interpreter's scripts
            # first, so the tests pass in a virtual environment that is not activated
            "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                     os.environ.get("PATH", "")]),
            TAG_VAR: self.tag,
            "FLWR_HOME": str(self.home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            # SuperExecs poll for new ServerApp/ClientApp tasks every 1 s by default
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
            # stay offline even if something tries to install or download
            "PIP_NO_INDEX": "1",
            "UV_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "NUMBA_CACHE_DIR": str(base / "numba-cache"),
            "OMP_NUM_THREADS": "1",
        }

    # -- generic ------------------------------------------------------------------------

    def start(self, name: str, argv: Sequence[str]) -> Process:
        log = self.logs / f"{name}.log"
        with log.open("wb") as sink:
            popen = subprocess.Popen(
                list(argv), cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=sink,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def flwr(self, name: str, *args: str, timeout: float = 60.0) -> Process:
        """Run a ``flwr`` CLI command to completion (tracked, so teardown can stop it)."""
        process = self.start(name, [executable("flwr"), *args])
        try:
            process.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`flwr {' '.join(args)}` ran over {timeout} s\n{self.tails()}")
        return process

    def tails(self) -> str:
        return "\n".join(process.tail() for process in self.processes)

    def stop_all(self, grace: float = 10.0) -> None:
        """SIGTERM what we started (newest first), then every process still carrying the
        tag (SuperExecs, ServerApp/ClientApp processes), then SIGKILL; all by PID."""

        def send(pid: int, sig: signal.Signals) -> None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

        for process in reversed(self.processes):
            if process.popen.poll() is None:
                send(process.popen.pid, signal.SIGTERM)
        wait_until(lambda: all(p.popen.poll() is not None for p in self.processes), grace)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in tagged_pids(self.tag):
                send(pid, sig)
            if wait_until(lambda: not tagged_pids(self.tag), grace):
                break
        for process in self.processes:
            if process.popen.poll() is None:
                process.popen.kill()
            process.popen.wait(timeout=grace)

    # -- Flower components --------------------------------------------------------------

    def start_superlink(self, *security: str) -> Process:
        """``flower-superlink`` on a free port (``security``: ``--insecure`` or the TLS
        and auth flags); returns once its HTTP API accepts connections."""
        (port,) = free_ports(1)
        self.superlink_address = f"127.0.0.1:{port}"
        superlink = self.start("superlink", [
            executable("flower-superlink"), *security, "--host", "127.0.0.1",
            "--port", str(port), "--disable-runtime-dependency-installation",
        ])  # fmt: skip

        def accepting() -> bool:
            assert superlink.popen.poll() is None, f"SuperLink exited\n{superlink.tail()}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return True
            except OSError:
                return False

        assert wait_until(accepting, 30), f"SuperLink not up in 30 s\n{superlink.tail()}"
        return superlink

    def write_connection(self, *, root_certificates: Path | None = None) -> None:
        """``$FLWR_HOME/config.toml`` with the SuperLink as the default connection."""
        security = (
            f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true"
        )
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{self.superlink_address}"\n{security}\n'
        )

    def start_supernode(self, name: str, partition_id: int, *security: str) -> Process:
        """``flower-supernode`` with its partition and a stable client id, on its own free
        runtime API port (the default 9094 would clash between SuperNodes)."""
        (port,) = free_ports(1)
        return self.start(name, [
            executable("flower-supernode"), *security, "--superlink", self.superlink_address,
            "--port", str(port),
            "--node-config", f'partition-id={partition_id} client-id="c{partition_id}"',
        ])  # fmt: skip

    def start_app(self, name: str, out: Path, rounds: int, **extra: Any) -> Process:
        """Start ``flwr run`` of the repository's app on the default connection (FedUGM with
        a ledger under ``out``); returns at once."""
        config = {**RUN_CONFIG, "num-server-rounds": rounds, "out": str(out),
                  "ledger": str(out / "ledger"), **extra}
        return self.start(name, [executable("flwr"), "run", str(ROOT), CONNECTION, "--stream",
                                 "--run-config", toml_pairs(config)])

    def run_app(self, out: Path, rounds: int, timeout: float = 240.0,
                **extra: Any) -> dict[str, Any]:
        """``flwr run`` to completion; the ServerApp's history JSON."""
        run = self.start_app("flwr-run", out, rounds, **extra)
        try:
            run.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`flwr run` ran over {timeout} s\n{self.tails()}")
        history = history_path(out, RUN_CONFIG["strategy"], 0)
        assert run.popen.returncode == 0 and history.exists(), self.tails()
        return json.loads(history.read_text())


def toml_pairs(config: Mapping[str, Any]) -> str:
    """``k1=v1 k2="v2"`` for ``flwr run --run-config`` (JSON strings are TOML strings)."""
    return " ".join(f"{key}={json.dumps(value)}" for key, value in config.items())


@pytest.fixture
def deployment(tmp_path):
    dep = Deployment(tmp_path)
    try:
        yield dep
    finally:
        dep.stop_all()
    left = tagged_pids(dep.tag)
    assert not left, f"processes left after teardown:\n{describe(left)}"


# ---------------------------------------------------------------------------------------
# keys and certificates (cryptography is a dependency of flwr itself)


def write_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost signed by it:
    (ca.pem, server.pem, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def builder(subject: str, issuer: str, public_key) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        builder("fl-ugm test CA", "fl-ugm test CA", ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        builder("localhost", "fl-ugm test CA", server_key.public_key())
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))  # fmt: skip
    paths[2].chmod(0o600)
    return paths


def write_node_key(directory: Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-384 SuperNode key pair in OpenSSH format (what ``ssh-keygen -t ecdsa -b
    384`` writes): (private key for the SuperNode, public key for ``flwr supernode
    register``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / name, directory / f"{name}.pub"
    private.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))  # fmt: skip
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))  # fmt: skip
    return private, public


# ---------------------------------------------------------------------------------------
# checks


def check_history(history: Mapping[str, Any], rounds: int, node_ids: set[int]) -> None:
    """Every round aggregated FedUGM replies from exactly ``node_ids``; accuracy rose."""
    assert [r["round"] for r in history["replies"]] == list(range(1, rounds + 1))
    for round_log in history["replies"]:
        assert set(round_log["nodes"]) == node_ids, (round_log, node_ids)
        assert round_log["errors"] == 0 and round_log["records"] == FEDUGM_RECORDS
    accuracy = history["accuracy"]
    assert len(accuracy) == rounds + 1  # the initial model, then one per round
    assert accuracy[-1] > accuracy[0] + 0.05, accuracy


def check_ledger(ledger: Path, client_ids: list[str]) -> None:
    """The ledger stores the clients under their node-config client-id."""
    from fl_ugm.ledger import Ledger

    assert Ledger(ledger).client_ids() == client_ids


def assert_refused(node: Process, message: str, timeout: float = 60.0) -> None:
    """The SuperNode gave up (``--max-retries 0``) without ever getting a node id."""
    wait_until(lambda: node.popen.poll() is not None, timeout)
    assert node.popen.poll() not in (None, 0), f"SuperNode was not refused\n{node.tail()}"
    assert message in node.output() and not NODE_ID.search(node.output()), node.tail()


def start_nodes(dep: Deployment, *security: str, count: int = 3) -> set[int]:
    nodes = [dep.start_supernode(f"supernode-{i}", i, *security) for i in range(count)]
    return {int(node.wait_for_output(NODE_ID, 60).group(1)) for node in nodes}


# ---------------------------------------------------------------------------------------
# tests


def test_tls_superlink_refuses_supernode_without_ca(deployment, tmp_path):
    ca, cert, key = write_tls_files(tmp_path)
    deployment.start_superlink(
        "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)
    )
    deployment.write_connection(root_certificates=ca)
    # neither --insecure nor --root-certificates: HTTPS verified against the system CAs
    stranger = deployment.start_supernode("supernode-no-ca", 0, "--max-retries", "0")
    node_ids = start_nodes(deployment, "--root-certificates", str(ca))
    assert_refused(stranger, "CERTIFICATE_VERIFY_FAILED")
    history = deployment.run_app(tmp_path / "out", rounds=2)
    check_history(history, rounds=2, node_ids=node_ids)
    check_ledger(tmp_path / "out" / "ledger", ["c0", "c1", "c2"])


def test_supernode_auth_admits_registered_keys_only(deployment, tmp_path):
    ca, cert, key = write_tls_files(tmp_path)
    deployment.start_superlink(
        "--ssl-ca-certfile",
        str(ca),
        "--ssl-certfile",
        str(cert),
        "--ssl-keyfile",
        str(key),
        "--enable-supernode-auth",
    )
    deployment.write_connection(root_certificates=ca)
    tls = ("--root-certificates", str(ca))
    registered = set()
    nodes = []
    for i in range(3):
        private, public = write_node_key(tmp_path, f"node-{i}")
        register = deployment.flwr(
            f"register-{i}", "supernode", "register", str(public), CONNECTION, "--format", "json"
        )
        assert register.popen.returncode == 0, register.tail()
        reply = json.loads(register.output()[register.output().index("{") :])
        assert reply["success"], reply
        registered.add(int(reply["node-id"]))
        nodes.append(
            deployment.start_supernode(
                f"supernode-{i}", i, *tls, "--auth-supernode-private-key", str(private)
            )
        )
    unregistered, _ = write_node_key(tmp_path, "node-unregistered")
    stranger = deployment.start_supernode(
        "supernode-unregistered", 0, *tls, "--auth-supernode-private-key", str(unregistered),
        "--max-retries", "0")  # fmt: skip
    node_ids = {int(node.wait_for_output(NODE_ID, 60).group(1)) for node in nodes}
    assert node_ids == registered
    assert_refused(stranger, "Failed to activate SuperNode")
    history = deployment.run_app(tmp_path / "out", rounds=2)
    check_history(history, rounds=2, node_ids=registered)


def test_server_killed_mid_run_resumes_from_the_ledger_without_a_removed_client(deployment,
                                                                              tmp_path):
    """SIGKILL the ServerApp process once round 1 of 4 is in the ledger; remove client c1
    offline (``fl-ugm remove --forget``); ``flwr run`` again with ``resume=true`` on the same
    ledger continues after the removal's global for the 4 training rounds (the removal's global
    is ledger round killed + 1, so the run ends at ledger round 5). c1's SuperNode is
    still connected but is never asked to train again, and c1 is never recorded again."""
    from fl_ugm.ledger import Ledger

    deployment.start_superlink("--insecure")
    deployment.write_connection()
    nodes = {f"c{i}": deployment.start_supernode(f"supernode-{i}", i, "--insecure")
             for i in range(3)}
    node_of = {c: int(node.wait_for_output(NODE_ID, 60).group(1)) for c, node in nodes.items()}
    out = tmp_path / "out"
    first = deployment.start_app("flwr-run-killed", out, rounds=4)

    def completed_rounds() -> int:
        index = out / "ledger" / "index.json"
        globals_ = json.loads(index.read_text())["globals"] if index.exists() else []
        return max((g["round"] for g in globals_), default=-1)

    assert wait_until(lambda: completed_rounds() >= 1, 180), deployment.tails()
    serverapps = [pid for pid in tagged_pids(deployment.tag)
                  if b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(serverapps) == 1, describe(serverapps)
    os.kill(serverapps[0], signal.SIGKILL)
    killed_after = completed_rounds()
    assert killed_after < 3
    wait_until(lambda: first.popen.poll() is not None, 60)  # the CLI notices the failed run

    remove = deployment.start("fl-ugm-remove", [
        executable("fl-ugm"), "remove", "--ledger", str(out / "ledger"), "--client", "c1",
        "--out", str(tmp_path / "without-c1.safetensors"), "--forget"])  # fmt: skip
    remove.popen.wait(timeout=120)
    assert remove.popen.returncode == 0, remove.tail()
    history = deployment.run_app(out, rounds=4, resume=True)
    assert history["resumed_from_round"] == killed_after + 1  # the removal's global
    assert len(history["accuracy"]) == 4 - killed_after + 1  # the removal is no training
    assert history["replies"], "no round ran after the resume"
    for round_log in history["replies"]:
        assert set(round_log["nodes"]) == {node_of["c0"], node_of["c2"]}, round_log
        assert round_log["errors"] == 0
    ledger = Ledger(out / "ledger")
    assert ledger.rounds()[-1] == 5 and ledger.removed_clients() == {"c1": killed_after + 1}
    assert ledger.client_ids() == ["c0", "c2"]
    for client in ("c0", "c2"):
        record = ledger.client(client)
        assert record.round == 5 and all(bool(v.abs().sum() > 0) for v in record.applied.values())


def test_the_quickstart_example_trains_removes_a_client_and_resumes(deployment, tmp_path):
    """The README's quickstart as a user runs it: ``flwr run examples/quickstart-pytorch`` on
    a simulation SuperLink (3 simulated SuperNodes: client ids from their partitions) for 2
    rounds with a ledger; a run that removes client "1" and trains nothing more; a resumed run
    to 3 training rounds in all, which trains one more round without client "1"."""
    from safetensors.torch import load_file

    from fl_ugm.ledger import Ledger

    deployment.start_superlink("--insecure", "--simulation")
    deployment.write_connection()
    ledger_dir, final = tmp_path / "ledger", tmp_path / "final.safetensors"

    def run(name: str, **config: Any) -> None:
        config = {"dataset": "mnist", "ledger": str(ledger_dir), **config}
        process = deployment.flwr(
            name, "run", str(ROOT / "examples" / "quickstart-pytorch"), CONNECTION, "--stream",
            "--federation-config", "num-supernodes=3 client-resources-num-cpus=1",
            "--run-config", toml_pairs(config), timeout=240)
        assert process.popen.returncode == 0, deployment.tails()

    run("flwr-run-train", **{"num-server-rounds": 2})
    ledger = Ledger(ledger_dir)
    assert ledger.rounds() == [0, 1, 2] and ledger.client_ids() == ["0", "1", "2"]
    before = ledger.global_state()[1]

    run("flwr-run-remove", **{"num-server-rounds": 2, "resume": True, "remove-client": "1"})
    ledger = Ledger(ledger_dir)
    assert ledger.removed_clients() == {"1": 3} and ledger.client_ids() == ["0", "2"]
    assert ledger.rounds() == [3]  # every global trained with client 1 is gone
    removed = ledger.global_state()[1]
    assert any(not torch.equal(removed[k], before[k]) for k in before)

    run("flwr-run-resume", **{"num-server-rounds": 3, "resume": True, "final-model": str(final)})
    ledger = Ledger(ledger_dir)
    assert ledger.rounds()[-1] == 4, deployment.tails()  # one training round after the removal
    assert ledger.client_ids() == ["0", "2"]
    assert all(ledger.client(c).round == 4 for c in ("0", "2"))
    newest = ledger.global_state()[1]
    assert all(torch.equal(load_file(str(final))[k], newest[k]) for k in newest)
