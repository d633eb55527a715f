"""Mutual TLS and worker identity: certificates from `feddiff certs`, tokens without mTLS, refusals with the
right status codes, and plain text only when asked for."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from cryptography import x509

from coordinator.config import CoordinatorConfig
from coordinator.metrics import Metrics
from coordinator.server import Coordinator
from fedcore.model.unet import build_model, layout_of
from fedcore.payload import serialization
from fedcore.payload.serialization import PayloadMeta
from fedcore.wire.convert import task_from_proto
from feddiff.certs import create_project
from feddiff.local import LocalCluster
from tests.system.raw_client import RawWorker

pytestmark = pytest.mark.security


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    create_project(out, ["localhost"], ["client-0", "client-1"])
    other = out / "other-ca"
    create_project(other, ["localhost"], ["client-0"])
    return out


def _coordinator(tmp_path: Path, **settings: Any) -> Coordinator:
    base: dict[str, Any] = {
        "model": "tiny",
        "strategy": "udec",
        "rounds": 1,
        "epochs": 1,
        "min_workers": 2,
        "listen": "localhost:0",
        "metrics_port": -1,
        "checkpoint_dir": str(tmp_path / "ckpt"),
        "round_deadline": 60.0,
    }
    return Coordinator(CoordinatorConfig(**{**base, **settings}), Metrics()).start()


def _mtls_channel(pki: Path, address: str, name: str, ca: Path | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(ca or pki / "ca.crt").read_bytes(),
        private_key=(pki / f"{name}.key").read_bytes(),
        certificate_chain=(pki / f"{name}.crt").read_bytes(),
    )
    return grpc.secure_channel(address, creds)


def test_certs_command_issues_a_ca_a_server_and_one_certificate_per_worker(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "feddiff", "certs", "--out-dir", str(tmp_path), "--coordinator-host", "coord.example.org", "--worker", "hospital-3"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert sorted(Path(p).name for p in out) == ["ca.crt", "coordinator.crt", "hospital-3.crt"]
    cert = x509.load_pem_x509_certificate((tmp_path / "hospital-3.crt").read_bytes())
    assert cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value == "hospital-3"
    server = x509.load_pem_x509_certificate((tmp_path / "coordinator.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "coord.example.org" in names
    assert (tmp_path / "hospital-3.key").stat().st_mode & 0o077 == 0, "private keys are readable by their owner only"


def test_mutual_tls_identity_comes_from_the_certificate(pki: Path, tmp_path: Path) -> None:
    coord = _coordinator(tmp_path, tls_cert=str(pki / "coordinator.crt"), tls_key=str(pki / "coordinator.key"), tls_ca=str(pki / "ca.crt"))
    try:
        with _mtls_channel(pki, coord.address, "client-0") as ch:
            assert RawWorker(ch, "client-0").join().session_id
            with pytest.raises(grpc.RpcError) as e:
                RawWorker(ch, "client-1").join()  # claims another worker's identity
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with _mtls_channel(pki, coord.address, "client-0", ca=pki / "other-ca" / "ca.crt") as ch:
            with pytest.raises(grpc.RpcError) as e:
                RawWorker(ch, "client-0").join()  # does not trust our server, nor we its client cert
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        other = pki / "other-ca"
        creds = grpc.ssl_channel_credentials((pki / "ca.crt").read_bytes(), (other / "client-0.key").read_bytes(), (other / "client-0.crt").read_bytes())
        with grpc.secure_channel(coord.address, creds) as ch:
            with pytest.raises(grpc.RpcError) as e:
                RawWorker(ch, "client-0").join()  # a certificate from another CA is refused in the handshake
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.secure_channel(coord.address, grpc.ssl_channel_credentials((pki / "ca.crt").read_bytes())) as ch, pytest.raises(grpc.RpcError):
            RawWorker(ch, "client-0").join()  # no client certificate at all
    finally:
        coord.stop()


def test_tokens_identify_workers_and_an_upload_for_another_identity_is_denied(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"client-0": "s3cret-zero", "client-1": "s3cret-one"}))
    coord = _coordinator(tmp_path, insecure=True, tokens_file=str(tokens))
    try:
        with grpc.insecure_channel(coord.address) as ch:
            bad = RawWorker(ch, "client-0", metadata=(("authorization", "Bearer wrong"),))
            with pytest.raises(grpc.RpcError) as e:
                bad.join()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            thief = RawWorker(ch, "client-1", metadata=(("authorization", "Bearer s3cret-zero"),))
            with pytest.raises(grpc.RpcError) as e:
                thief.join()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            w0 = RawWorker(ch, "client-0", metadata=(("authorization", "Bearer s3cret-zero"),))
            w1 = RawWorker(ch, "client-1", metadata=(("authorization", "Bearer s3cret-one"),))
            w0.join(), w1.join()
            t0, t1 = task_from_proto(w0.wait_task()), task_from_proto(w1.wait_task())
            # Worker 0 uploads a well-formed update for worker 1's task: not its task.
            layout = layout_of(build_model("tiny"))
            delta = {n: torch.zeros(s.shape) + 0.01 for n, s in layout.specs(t1.returns).items()}
            payload = serialization.encode(delta, PayloadMeta(kind="delta", model="tiny", wire_round=t1.round_index, parts=t1.returns))
            with pytest.raises(grpc.RpcError) as e:
                w0.upload_messages(w0.update_messages(t1, payload))
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # A session used with another worker's token is refused as well.
            hijack = RawWorker(ch, "client-1", metadata=(("authorization", "Bearer s3cret-zero"),), session_id=w1.session_id)
            with pytest.raises(grpc.RpcError) as e:
                hijack.wait_task(timeout=1)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert t0.task_id != t1.task_id
    finally:
        coord.stop()


def test_plain_text_needs_insecure_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="--insecure"):
        _coordinator(tmp_path)
    with caplog.at_level(logging.WARNING, logger="feddiff.coordinator"):
        _coordinator(tmp_path, insecure=True).stop()
    assert "plain-text" in caplog.text


def test_a_federated_run_over_mutual_tls_with_real_worker_processes(pki: Path, tmp_path: Path) -> None:
    tls = ["--tls-cert", str(pki / "coordinator.crt"), "--tls-key", str(pki / "coordinator.key"), "--tls-ca", str(pki / "ca.crt")]
    with LocalCluster(tmp_path) as cluster:
        coord = cluster.coordinator(
            *tls, "--model", "tiny", "--strategy", "udec", "--rounds", "1", "--epochs", "1", "--min-workers", "2", "--listen", "localhost:0"
        )
        address = coord.ready["address"].replace("127.0.0.1", "localhost")
        workers = cluster.workers(
            address,
            {
                f"client-{i}": [
                    "--tls-ca",
                    str(pki / "ca.crt"),
                    "--tls-cert",
                    str(pki / f"client-{i}.crt"),
                    "--tls-key",
                    str(pki / f"client-{i}.key"),
                    "--client-index",
                    str(i),
                    "--num-clients",
                    "2",
                    "--max-images",
                    "64",
                    "--threads",
                    "1",
                    "--keep-running",
                ]
                for i in range(2)
            },
        )
        import time

        deadline = time.monotonic() + 120
        while not (tmp_path / "checkpoints" / "final.safetensors").exists():
            assert time.monotonic() < deadline, coord.output()[-2000:]
            for p in (coord, *workers):
                assert p.proc.poll() is None, p.output()[-2000:]
            time.sleep(0.2)
    assert "joined" in coord.output() and "plain-text" not in coord.output()


def test_health_and_status_commands_speak_mutual_tls(pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from feddiff.cli import main

    coord = _coordinator(tmp_path, tls_cert=str(pki / "coordinator.crt"), tls_key=str(pki / "coordinator.key"), tls_ca=str(pki / "ca.crt"))
    tls = ["--tls-ca", str(pki / "ca.crt"), "--tls-cert", str(pki / "client-0.crt"), "--tls-key", str(pki / "client-0.key")]
    try:
        assert main(["health", "--address", coord.address, *tls]) == 0
        assert "SERVING" in capsys.readouterr().out
        assert main(["status", "--address", coord.address, "--json", *tls]) == 0
        assert json.loads(capsys.readouterr().out)["state"] == "waiting_for_workers"
        assert main(["health", "--address", coord.address, "--timeout", "3"]) == 1  # plain text to a TLS port
        assert "UNAVAILABLE" in capsys.readouterr().err
    finally:
        coord.stop()


@pytest.mark.parametrize(
    ("process", "files", "line"),
    [
        ("coordinator", {"--tls-cert": "bad", "--tls-key": "coordinator.key"}, "--tls-cert {bad}: not a PEM certificate"),
        (
            "coordinator",
            {"--tls-cert": "coordinator.crt", "--tls-key": "client-0.key"},
            "--tls-key {client-0.key}: not the key of the certificate in --tls-cert {coordinator.crt}",
        ),
        ("coordinator", {"--tls-cert": "coordinator.crt", "--tls-key": "coordinator.key", "--tls-ca": "bad"}, "--tls-ca {bad}: not a PEM certificate"),
        ("worker", {"--tls-ca": "bad"}, "--tls-ca {bad}: not a PEM certificate"),
        (
            "worker",
            {"--tls-ca": "ca.crt", "--tls-cert": "client-0.crt", "--tls-key": "client-1.key"},
            "--tls-key {client-1.key}: not the key of the certificate in --tls-cert {client-0.crt}",
        ),
        ("worker", {"--tls-ca": "ca.crt", "--tls-cert": "client-0.crt", "--tls-key": "bad"}, "--tls-key {bad}: not an unencrypted PEM private key"),
    ],
)
def test_tls_files_that_are_not_what_their_flag_says_are_refused_at_start(process: str, files: dict[str, str], line: str, pki: Path, tmp_path: Path) -> None:
    """A garbage certificate, or a key of another certificate, made the coordinator say it "cannot listen" on
    its port and a worker retry a failing handshake for ever; now each exits 2 naming the flag and the file."""
    (tmp_path / "bad").write_text("not a certificate\n")
    path = {name: str(tmp_path / "bad") if name == "bad" else str(pki / name) for name in (*files.values(), "bad")}
    flags = [x for flag, name in files.items() for x in (flag, path[name])]
    common = ["--metrics-port", "-1"]
    if process == "coordinator":
        argv = ["coordinator", *flags, *common, "--listen", "127.0.0.1:0", "--checkpoint-dir", str(tmp_path / "ckpt")]
    else:
        argv = ["worker", *flags, *common, "--coordinator", "localhost:9", "--client-index", "0", "--state-dir", str(tmp_path / "state")]

    result = subprocess.run([sys.executable, "-m", "feddiff", *argv], capture_output=True, text=True, timeout=120, check=False)

    expected = line
    for name, p in path.items():
        expected = expected.replace(f"{{{name}}}", p)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"feddiff {process}: error: {expected}"), result.stderr
    assert "Traceback" not in result.stderr
