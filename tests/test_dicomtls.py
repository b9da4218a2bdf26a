"""DICOM over TLS (PS3.15 BCP 195): `primis serve --tls-*` and `restore-to --tls-*` against
pynetdicom and DCMTK's TLS-enabled echoscu, storescu and storescp (Debian's `dcmtk`), with a
certificate authority, node and client certificates made here."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
import warnings
from pathlib import Path

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

import primis
from primis.dicomnode import SUCCESS, DicomNode, client_tls, server_tls
from tests.conftest import assert_clean_failure, run_cli
from tests.test_dicomnode import PATIENT_NAME, Served, files, free_port, instance, need_peer


def _dcmtk_program(name: str) -> str | None:
    """DCMTK's NAME on the PATH (pynetdicom installs Python programs of the same names)."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        found = shutil.which(name, path=folder)
        if found and Path(found).read_bytes()[:4] == b"\x7fELF":
            return found
    return None


DCMTK = {name: _dcmtk_program(name) for name in ("echoscu", "storescu", "storescp")}


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _certificate(folder: Path, name: str, issuer=None, server=False, ca=False):
    """NAME.key and NAME.crt (PEM) in ``folder``: a CA (self-signed), or a node (server,
    for localhost and 127.0.0.1) or client certificate signed by ``issuer`` (key, cert)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    signer_key, signer = issuer if issuer else (key, None)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(signer.subject if signer else _name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        usage = dict.fromkeys(("digital_signature", "content_commitment", "key_encipherment"))
        builder = builder.add_extension(
            x509.KeyUsage(
                **{k: False for k in usage},
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    else:
        purpose = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()), False
        )
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(signer_key, hashes.SHA256())
    (folder / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca, node (localhost, 127.0.0.1), client (signed by ca); rogue-ca and rogue (a client
    certificate of another authority)."""
    folder = tmp_path_factory.mktemp("pki")
    ca = _certificate(folder, "ca", ca=True)
    _certificate(folder, "node", ca, server=True)
    _certificate(folder, "client", ca)
    rogue_ca = _certificate(folder, "rogue-ca", ca=True)
    _certificate(folder, "rogue", rogue_ca)
    return folder


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return primis.load_model(tiny_model_dir, device="cpu")


def _associate(address, tls=None, called="PRIMIS"):
    ae = AE("MODALITY")
    ae.add_requested_context(Verification)
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.network_timeout = 10
    tls_args = (tls, "localhost") if tls else None
    return ae.associate(*address, ae_title=called, tls_args=tls_args)


def _mutual(pki: Path) -> ssl.SSLContext:
    return server_tls(pki / "node.crt", pki / "node.key", pki / "ca.crt")


def test_a_tls_node_serves_clients_with_certificates_and_refuses_everyone_else(
    tmp_path, pki, model, caplog
):
    caplog.set_level("INFO", logger="primis.dicomnode")
    tls = _mutual(pki)
    with DicomNode(tmp_path / "p", tmp_path / "k", model, port=0, tls=tls, refine_steps=0) as node:
        address = node.address
        assert address[0] == "127.0.0.1"
        stalled = socket.create_connection(address)  # connects and sends nothing
        try:
            good = client_tls(pki / "ca.crt", pki / "client.crt", pki / "client.key")
            association = _associate(address, good)
            assert association.is_established  # the stalled peer blocks no one
            assert int(association.send_c_echo().Status) == SUCCESS
            assert int(association.send_c_store(instance(1)).Status) == SUCCESS
            association.release()
        finally:
            stalled.close()
        refused = {
            "plain TCP": None,
            "no client certificate": client_tls(pki / "ca.crt"),
            "another authority's certificate": client_tls(
                pki / "ca.crt", pki / "rogue.crt", pki / "rogue.key"
            ),
        }
        for why, context in refused.items():
            association = _associate(address, context)
            assert not association.is_established, why
    assert node.stats.stored == 1
    assert re.search(
        r"association from AE 'MODALITY' .*\(TLSv1\.[23] .*commonName=client\)", caplog.text
    )
    # A client that does not trust the node's authority refuses it, whatever its own cert.
    with DicomNode(tmp_path / "p", tmp_path / "k", model, port=0, tls=tls) as node:
        distrust = client_tls(pki / "rogue-ca.crt", pki / "client.crt", pki / "client.key")
        assert not _associate(node.address, distrust).is_established


def test_tls_settings_follow_bcp_195():
    for context in (client_tls(),):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
        ciphers = [c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
        assert ciphers and all(("GCM" in c or "CHACHA20" in c) and "DHE" in c for c in ciphers)


def test_tls_1_2_clients_get_a_bcp_195_suite_and_older_ones_are_refused(
    tmp_path, pki, model, caplog
):
    caplog.set_level("INFO", logger="primis.dicomnode")
    with DicomNode(tmp_path / "p", tmp_path / "k", model, port=0, tls=_mutual(pki)) as node:
        twelve = client_tls(pki / "ca.crt", pki / "client.crt", pki / "client.key")
        twelve.maximum_version = ssl.TLSVersion.TLSv1_2
        association = _associate(node.address, twelve)
        assert association.is_established
        association.release()
        old = client_tls(pki / "ca.crt", pki / "client.crt", pki / "client.key")
        with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        with contextlib.suppress(ssl.SSLError):  # OpenSSL here may refuse to offer TLS 1.1
            assert not _associate(node.address, old).is_established
    assert re.search(r"\(TLSv1\.2 ECDHE-RSA-(AES\d+-GCM-SHA\d+|CHACHA20-POLY1305)", caplog.text)


def test_the_called_ae_title_can_be_required(tmp_path, model):
    options = {"port": 0, "refine_steps": 0, "require_called_ae": True}
    with DicomNode(tmp_path / "p", tmp_path / "k", model, **options) as node:
        assert _associate(node.address, called="ANYONE").is_rejected
        association = _associate(node.address)
        assert association.is_established
        association.release()


def _dcmtk(tool: str, *args: object, timeout: float = 60) -> subprocess.CompletedProcess:
    need_peer(DCMTK[tool], f"DCMTK's {tool}", "dcmtk")
    command = [DCMTK[tool], *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("profile", ["+py", "+px"])  # BCP 195 non-downgrading, and BCP 195
def test_dcmtk_tls_clients_against_primis_serve(tmp_path, pki, tiny_model_dir, profile):
    path = tmp_path / "in.dcm"
    instance(2).save_as(path, enforce_file_format=True)
    tls = ["--tls-cert", pki / "node.crt", "--tls-key", pki / "node.key"]
    tls += ["--tls-ca", pki / "ca.crt"]
    folders = ["--public-dir", tmp_path / "p", "--key-dir", tmp_path / "k"]
    with Served("--model", tiny_model_dir, *folders, "--refine-steps", "0", *tls) as served:
        assert "(TLS with client certificates)" in "".join(served.log)
        peer = ["127.0.0.1", served.port, "-aec", "PRIMIS", "-to", "20", "-ta", "20"]
        client = ["+tls", pki / "client.key", pki / "client.crt", "+cf", pki / "ca.crt", profile]
        echo = _dcmtk("echoscu", *client, *peer)
        assert echo.returncode == 0, echo.stderr
        sent = _dcmtk("storescu", *client, *peer, path)
        assert sent.returncode == 0, sent.stderr
        assert _dcmtk("echoscu", *peer).returncode != 0  # plain TCP
        rogue = ["+tls", pki / "rogue.key", pki / "rogue.crt", "+cf", pki / "ca.crt", profile]
        assert _dcmtk("echoscu", *rogue, *peer).returncode != 0
        anonymous = ["+tla", "+cf", pki / "ca.crt", profile]
        assert _dcmtk("echoscu", *anonymous, *peer).returncode != 0
        assert served.stop() == 0
    assert "1 received, 1 shared" in "".join(served.log)
    assert len(files(tmp_path / "p", ".primis")) == 1


class _TlsReceiver:
    """A pynetdicom Storage SCP over TLS that keeps what it receives."""

    def __init__(self, tls: ssl.SSLContext) -> None:
        self.received: list = []
        ae = AE("PACS")
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ExplicitVRLittleEndian)
        handlers = [(evt.EVT_C_STORE, self._store)]
        self.server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=handlers, ssl_context=tls
        )
        self.port = self.server.server_address[1]

    def _store(self, event) -> int:
        self.received.append(event.dataset)
        return SUCCESS


def test_restore_to_sends_over_tls_to_storescp_and_pynetdicom(tmp_path, pki, tiny_model_dir, model):
    source = tmp_path / "in.dcm"
    instance(3).save_as(source, enforce_file_format=True)
    done = primis.share_file(source, tmp_path / "p", tmp_path / "k", model, keep_header=True)
    client = ["--tls-ca", pki / "ca.crt", "--tls-cert", pki / "client.crt"]
    client += ["--tls-key", pki / "client.key"]
    base = ["restore-to", done.public_path, "--model", tiny_model_dir, "--key-dir", tmp_path / "k"]
    base += ["--host", "localhost", "--called-ae", "PACS"]
    receiver = _TlsReceiver(_mutual(pki))
    try:
        result = run_cli(*base, "--port", receiver.port, *client)
        assert result.returncode == 0, result.stderr
        assert [str(d.PatientName) for d in receiver.received] == [PATIENT_NAME]
        plain = run_cli(*base, "--port", receiver.port)
        assert_clean_failure(plain, "cannot associate with PACS")
        distrust = ["--tls", "--tls-ca", pki / "rogue-ca.crt"]
        untrusting = run_cli(*base, "--port", receiver.port, *distrust)
        assert_clean_failure(untrusting, "cannot associate with PACS")
    finally:
        receiver.server.shutdown()
    port, out = free_port(), tmp_path / "storescp"
    out.mkdir()
    need_peer(DCMTK["storescp"], "DCMTK's storescp", "dcmtk")
    server = ["+tls", pki / "node.key", pki / "node.crt", "+cf", pki / "ca.crt", "-aet", "PACS"]
    scp = subprocess.Popen(
        [DCMTK["storescp"], *map(str, server), "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            result = run_cli(*base, "--port", port, *client)
            if result.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.3)  # storescp still starting
        assert result.returncode == 0, result.stderr
    finally:
        scp.terminate()
        scp.wait(10)
    (received,) = out.iterdir()
    assert str(pydicom.dcmread(received).PatientName) == PATIENT_NAME


def test_tls_settings_are_checked_in_one_line(tmp_path, pki, tiny_model_dir):
    folders = ["--public-dir", tmp_path / "p", "--key-dir", tmp_path / "k"]
    serve = ["serve", "--model", tiny_model_dir, *folders, "--port", "0"]
    result = run_cli(*serve, "--tls-cert", pki / "node.crt", "--tls-key", pki / "client.key")
    assert_clean_failure(result, "not a matching PEM certificate and private key")
    assert_clean_failure(run_cli(*serve, "--tls-cert", pki / "node.crt"), "go together")
    assert_clean_failure(run_cli(*serve, "--tls-ca", pki / "ca.crt"), "--tls-ca needs")
    result = run_cli(
        *serve, "--tls-cert", pki / "node.crt", "--tls-key", pki / "node.key",
        "--tls-ca", tmp_path / "missing.crt",
    )  # fmt: skip
    assert_clean_failure(result, "no such file")
