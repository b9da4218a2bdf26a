"""A DICOM node: receive images from a PACS by C-STORE and share each one as `primis ambiguate`
does (`DicomNode`, `primis serve`); send authorized reconstructions to a DICOM node by C-STORE
(`StorageClient`, `restore_to`, `primis restore-to`).

What happens to a received instance::

    connection: every PDU's declared length checked against ``max_pdu_bytes`` before it is
      read, the data set's bytes counted against ``max_instance_bytes`` as they arrive (over
      either: the connection is closed); with ``tls``, the TLS handshake first
    C-STORE request (the image storage SOP classes by default, any transfer syntax pydicom
    decodes)
      -> room in the spool: at most ``queue_size`` instances and ``spool_max_bytes`` bytes
         waiting to be shared; past that the request waits up to ``queue_timeout`` seconds,
         then is refused (0xA700 Out of Resources)
      -> SPOOL/<random>.dcm: the data set as sent, with its file meta (0600), written to a
         temporary name, synced, renamed, the folder synced
      -> ``ack="after-spool"`` (the default): the header checks that can fail fast (pixel data
         present, one frame, size limits; else 0xC000 and SPOOL/failed/), then 0x0000 Success
      -> one worker shares it with `primis.api.share_into`: PUBLIC_DIR/<file id>.primis and
         KEY_DIR/<file id>.primiskey written together (the key wrapped where ``wrapping`` says),
         the private manifest keyed by the SOP Instance UID and a fingerprint of the content
         (an instance sent again with the same content is a duplicate; one with other content
         is a new file), folders synced
      -> ``ack="after-share"``: the C-STORE response now: 0x0000 once both files are on disk;
         0xC000 Cannot Understand for an instance PRIMIS cannot share (its spooled file moved
         to SPOOL/failed/ with the reason beside it, under the retention rule ``failed_keep``
         and ``failed_days``); 0xA700 for a full disk or another OS error (its spooled file
         kept for the next start).

A spooled file goes only once its outputs are in place, so a node killed at any point loses
nothing it acknowledged: the next start shares what is left in the spool ahead of anything new
(an instance the sender retries meanwhile is acknowledged as already shared). Stopping
(`DicomNode.stop`, SIGTERM for `primis serve`) accepts no new association, refuses new C-STORE
requests on open ones (0xA700: the sender retries later), shares what is queued (answering its
senders with after-share), then closes. The log has one line per association (AE title,
address, TLS, client certificate) and per instance naming its random spool id, the calling AE
title, the SOP class and the file id, never patient data (pynetdicom's own INFO log prints data
set attributes: `DicomNode.start` keeps it at WARNING, see `quiet_pynetdicom`).

The node never hangs on one instance: whatever goes wrong while sharing it (a bug included)
fails that instance (0x0110 Processing Failure with after-share) and the worker goes on; a
C-STORE waits at most ``answer_timeout`` seconds for its answer (then 0xA700: the instance stays
queued, and a retry is acknowledged once it is shared).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Unpack

from primis.api import (
    ModelLike,
    ShareOptions,
    load_model,
    restore_dicom,
    share_into,
    share_settings,
)
from primis.batch import SharingOutputs, describe_os_error, output_folders
from primis.config import NODE_DEFAULTS
from primis.errors import PrimisError, one_line
from primis.io.dicom import check_dicom_header, content_fingerprint
from primis.io.files import clean_stale_parts, sync_folder, write_atomic
from primis.keywrap import KeyWrapping
from primis.modelstore import LoadedModel

LOG = logging.getLogger("primis.dicomnode")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110
# C-STORE warnings (coercion of data elements, elements discarded, data set does not match the
# SOP class): the instance was stored.
STORE_WARNINGS = {0x0001, 0xB000, 0xB006, 0xB007}


def receivable_transfer_syntaxes() -> list[str]:
    """The transfer syntaxes the node accepts: every one whose pixel data pydicom can decode
    here (uncompressed and deflated, and with the pylibjpeg plug-ins JPEG baseline, extended and
    lossless, JPEG-LS, JPEG 2000, HTJ2K and RLE), uncompressed first."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import AllTransferSyntaxes

    found = []
    for uid in AllTransferSyntaxes:
        with contextlib.suppress(NotImplementedError):
            if get_decoder(uid).is_available:
                found.append(uid)
    return sorted(found, key=lambda uid: uid.is_compressed)


def image_storage_classes() -> list[str]:
    """The image storage SOP classes pynetdicom knows (those whose name says "Image Storage":
    CR, DX, MG, CT, MR, US, Secondary Capture, ...): what the node accepts by default. Reports,
    PDFs, structured reports, waveforms and RT objects are refused at association time."""
    from pynetdicom import StoragePresentationContexts

    return [
        str(c.abstract_syntax)
        for c in StoragePresentationContexts
        if "Image Storage" in c.abstract_syntax.name
    ]


def all_storage_classes() -> list[str]:
    """Every storage SOP class pynetdicom knows (``--sop-classes all``)."""
    from pynetdicom import StoragePresentationContexts

    return [str(c.abstract_syntax) for c in StoragePresentationContexts]


class _BoundedReads:
    """An association socket's reads, bounded as they happen: a PDU that declares more than
    ``max_pdu`` bytes, or P-DATA that carries more than ``max_instance`` bytes of one data set,
    closes the connection before the rest is read (pynetdicom reads a whole PDU of any
    declared length, up to 4 GiB, and a whole data set, before any handler runs)."""

    _PDU_TYPES = frozenset(range(1, 8))

    def __init__(self, recv, max_pdu: int, max_instance: int, peer: str) -> None:
        self.recv, self.max_pdu, self.max_instance, self.peer = recv, max_pdu, max_instance, peer
        self.body: tuple[int, int] | None = None  # (PDU type, length) of the body to come
        self.instance = 0  # data set bytes of the message being received

    def __call__(self, count: int) -> bytearray:
        if self.body is not None and count == self.body[1]:
            kind, self.body = self.body[0], None
            if count > self.max_pdu:
                raise self._close(f"a PDU of {count} B declared (at most {self.max_pdu} B)")
            data = self.recv(count)
            if kind == 0x04:  # P-DATA-TF
                self._count(data)
            return data
        data = self.recv(count)
        if count == 6 and len(data) == 6 and data[0] in self._PDU_TYPES:
            self.body = (data[0], int.from_bytes(data[2:6], "big"))
        return data

    def _count(self, data: bytearray) -> None:
        """Add the data set fragments of a P-DATA-TF body (PDV items: length u32, context id,
        control header; bit 0 of the header set for a command, bit 1 for the last fragment)."""
        at = 0
        while at + 6 <= len(data):
            length = int.from_bytes(data[at : at + 4], "big")
            control = data[at + 5]
            if not control & 1:
                self.instance += max(length - 2, 0)
                if self.instance > self.max_instance:
                    raise self._close(
                        f"a data set of more than {self.max_instance} B (the instance limit)"
                    )
                if control & 2:
                    self.instance = 0
            at += 4 + length

    def _close(self, why: str) -> OSError:
        LOG.warning("closing the connection from %s: %s", self.peer, why)
        return OSError(why)


def quiet_pynetdicom() -> None:
    """Keep pynetdicom's log to warnings and errors: at INFO and DEBUG it prints the attributes
    of the data sets it receives and sends (patient data). A logger set to WARNING or above is
    left as it is; set it lower after `DicomNode.start` to debug the protocol on test data."""
    pynetdicom_log = logging.getLogger("pynetdicom")
    if pynetdicom_log.level < logging.WARNING:
        pynetdicom_log.setLevel(logging.WARNING)


def check_ae_title(title: str) -> str:
    """``title`` if DICOM allows it as an AE title (at most 16 characters, not only spaces, no
    backslash or control character), else a PrimisError saying why."""
    from pynetdicom import _config

    valid, reason = _config.VALIDATORS["AE"](title) if title.strip() else (False, "is empty")
    if not valid:
        raise PrimisError(f"AE title {title!r}: {reason}")
    return title


READ_TIMEOUT = 60.0  # seconds a connection may stay silent in the middle of a PDU

# PS3.15 Annex B.9 (BCP 195, RFC 9325): TLS 1.2 or later, forward-secret AEAD suites only.
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"


class _ServerContext(ssl.SSLContext):
    """A server context whose handshake runs in the association's thread, not in the thread
    that accepts connections: pynetdicom wraps each accepted socket in its accept loop, where a
    peer that connects and sends nothing would otherwise stop every later connection. The
    socket gets ``timeout`` (seconds) for the handshake and every read after it."""

    timeout: float = 60.0

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, **kwargs):
        sock.settimeout(self.timeout)
        return super().wrap_socket(
            sock, server_side=server_side, do_handshake_on_connect=False, **kwargs
        )


def _bcp195(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)  # TLS 1.3 suites are all AEAD and stay enabled
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as err:
        raise PrimisError(f"{err.filename}: no such file") from None
    except (ssl.SSLError, OSError) as err:
        raise PrimisError(
            f"{cert}, {key}: not a matching PEM certificate and private key ({err})"
        ) from None


def _load_ca(context: ssl.SSLContext, ca: Path) -> None:
    try:
        context.load_verify_locations(cafile=ca)
    except FileNotFoundError:
        raise PrimisError(f"{ca}: no such file") from None
    except (ssl.SSLError, OSError) as err:
        raise PrimisError(f"{ca}: not a PEM certificate bundle ({err})") from None


def server_tls(
    cert: str | os.PathLike,
    key: str | os.PathLike,
    ca: str | os.PathLike | None = None,
    timeout: float = 60.0,
) -> ssl.SSLContext:
    """The TLS settings of a node (`DicomNode` ``tls``; `primis serve --tls-*`): its
    certificate chain ``cert`` and private ``key`` (PEM), BCP 195 (TLS 1.2 or later, ECDHE or
    DHE with AES-GCM or ChaCha20-Poly1305). With ``ca`` (PEM bundle), mutual TLS: a client
    must present a certificate that these authorities signed, or the handshake fails.
    ``timeout`` bounds the handshake and each later read, in seconds."""
    context = _bcp195(_ServerContext(ssl.PROTOCOL_TLS_SERVER))
    context.timeout = timeout
    _load_chain(context, Path(cert), Path(key))
    if ca is not None:
        _load_ca(context, Path(ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_tls(
    ca: str | os.PathLike | None = None,
    cert: str | os.PathLike | None = None,
    key: str | os.PathLike | None = None,
) -> ssl.SSLContext:
    """The TLS settings of a client (`StorageClient` ``tls``; `primis restore-to --tls-*`):
    the peer's certificate must be signed by ``ca`` (PEM bundle; default: the system's
    authorities) and name the host connected to; ``cert`` and ``key`` (PEM) are this side's
    certificate for a node that requires one. BCP 195 as in `server_tls`."""
    if (cert is None) != (key is None):
        raise PrimisError("a TLS client certificate needs both --tls-cert and --tls-key")
    context = _bcp195(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))  # verifies peer and host name
    if ca is not None:
        _load_ca(context, Path(ca))
    else:
        context.load_default_certs()
    if cert is not None:
        _load_chain(context, Path(cert), Path(key))
    return context


def _private_folder(folder: Path) -> Path:
    """A folder for patient data: created 0700 (an existing one is left as it is)."""
    output_folders(folder.parent)
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    output_folders(folder)
    return folder


@dataclass
class NodeStats:
    """What a node did: instances received (spooled), shared, acknowledged as already shared,
    failed, and refused (queue full, stopping, or not spooled)."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    refused: int = 0


@dataclass
class _Job:
    path: Path
    calling_ae: str
    size: int = 0  # bytes held in the spool's quota until the job is done
    done: threading.Event = field(default_factory=threading.Event)
    status: int = PROCESSING_FAILURE


Ack = Literal["after-spool", "after-share"]


class DicomNode:
    """A DICOM Storage SCP (and Verification SCP) that shares every received instance into
    PUBLIC_DIR and KEY_DIR as `primis ambiguate` does for a DICOM file (outputs named by file
    id; ``options`` are those of `primis.api.share`). See the module docstring for what happens
    to an instance and which status its sender gets.

    ``wrapping`` (`primis.keywrap.KeyWrapping`) writes every key wrapped for its recipients
    and/or passphrase, never in clear. ``spool_dir`` (default KEY_DIR/spool) holds received
    instances until they are shared, and in ``failed/`` those that could not be: patient data,
    0600 files in a 0700 folder.
    ``allow`` restricts the calling AE titles (empty: any), ``require_called_ae`` refuses an
    association addressed to another AE title than ``ae_title``; ``max_associations`` bounds
    the concurrent associations. ``host`` is the address listened on (default 127.0.0.1: this
    machine only); ``port`` 0 picks a free port (see `address`). ``tls`` (`server_tls`) makes
    it a DICOM TLS node: plain TCP is refused, and with a CA every client must present a
    certificate it signed. An AE title is a name any caller can claim; only TLS with client
    certificates authenticates callers.

    Use it as a context manager, or call `start` and `stop`::

        with DicomNode("public", "keys", model, port=11112, refine_steps=0) as node:
            ...  # serving until the block ends
    """

    def __init__(
        self,
        public_dir: str | os.PathLike,
        key_dir: str | os.PathLike,
        model: ModelLike = None,
        *,
        ae_title: str = NODE_DEFAULTS.ae_title,
        host: str = NODE_DEFAULTS.host,
        port: int = NODE_DEFAULTS.port,
        spool_dir: str | os.PathLike | None = None,
        allow: Sequence[str] = (),
        tls: ssl.SSLContext | None = None,
        require_called_ae: bool = False,
        queue_size: int | None = None,
        queue_timeout: float = NODE_DEFAULTS.queue_timeout,
        ack: Ack = NODE_DEFAULTS.ack,
        spool_max_bytes: int = NODE_DEFAULTS.spool_max_bytes,
        max_pdu_bytes: int = NODE_DEFAULTS.max_pdu_bytes,
        max_instance_bytes: int = NODE_DEFAULTS.max_instance_bytes,
        sop_classes: Sequence[str] | None = None,
        failed_keep: int = NODE_DEFAULTS.failed_keep,
        failed_days: float = NODE_DEFAULTS.failed_days,
        max_associations: int = NODE_DEFAULTS.max_associations,
        answer_timeout: float = NODE_DEFAULTS.answer_timeout,
        wrapping: KeyWrapping | None = None,
        **options: Unpack[ShareOptions],
    ) -> None:
        if queue_size is None:
            queue_size = (
                NODE_DEFAULTS.queue_after_spool
                if ack == "after-spool"
                else NODE_DEFAULTS.queue_after_share
            )
        if ack not in ("after-spool", "after-share"):
            raise PrimisError(f"ack {ack!r}: after-spool or after-share")
        if min(spool_max_bytes, max_pdu_bytes, max_instance_bytes) < 1024:
            raise PrimisError("the spool quota, PDU and instance limits must be at least 1 KiB")
        if failed_keep < 0 or failed_days < 0:
            raise PrimisError("the retention of failed instances cannot be negative")
        self.max_pdu_bytes, self.max_instance_bytes = max_pdu_bytes, max_instance_bytes
        self.failed_keep, self.failed_days = failed_keep, failed_days
        self.sop_classes = list(sop_classes) if sop_classes is not None else None
        if queue_size < 1 or queue_timeout < 0 or max_associations < 1 or answer_timeout <= 0:
            raise PrimisError(
                "queue size and associations must be at least 1, queue timeout >= 0, "
                "answer timeout > 0"
            )
        self.answer_timeout, self.wrapping = answer_timeout, wrapping
        self.public_dir, self.key_dir = Path(public_dir), Path(key_dir)
        self.spool_dir = Path(spool_dir) if spool_dir else self.key_dir / "spool"
        self.model = model if isinstance(model, LoadedModel) else load_model(model)
        self.settings = share_settings(self.model, options, stacklevel=3)  # warns once, here
        self.ae_title, self.allow = check_ae_title(ae_title), [check_ae_title(a) for a in allow]
        self.host, self.port = host, port
        self.tls, self.require_called_ae = tls, require_called_ae
        self.queue_timeout, self.max_associations = queue_timeout, max_associations
        self.stats = NodeStats()
        self.ack, self.queue_size, self.spool_max_bytes = ack, queue_size, spool_max_bytes
        self._room = threading.Condition()  # guards the two counters below
        self._pending = self._pending_bytes = 0  # spooled, not yet shared (the quota)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._stopping = False
        self._server = None
        self._worker: threading.Thread | None = None
        self._outputs: SharingOutputs | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The host and port the node listens on (the real port when ``port`` was 0)."""
        if self._server is None:
            raise PrimisError("the DICOM node is not running")
        host, port = self._server.server_address[:2]
        return host, port

    def start(self) -> DicomNode:
        """Queue what a previous run left in the spool, listen, and start sharing."""
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification

        if self._server is not None:
            raise PrimisError("the DICOM node is running already")
        quiet_pynetdicom()
        self._stopping = False
        ae = AE(self.ae_title)
        ae.require_calling_aet = self.allow
        ae.require_called_aet = self.require_called_ae
        ae.maximum_associations = self.max_associations
        syntaxes = receivable_transfer_syntaxes()
        for sop_class in self.sop_classes or image_storage_classes():
            ae.add_supported_context(sop_class, syntaxes)
        ae.add_supported_context(Verification)
        self._outputs = SharingOutputs(self.public_dir, self.key_dir, self.wrapping)
        _private_folder(self.spool_dir)
        clean_stale_parts(self.spool_dir)
        self._prune_failed()
        left = sorted(self.spool_dir.glob("*.dcm"), key=lambda p: p.stat().st_mtime)
        if left:
            LOG.info("sharing %d instance(s) left in the spool by a previous run", len(left))
        for path in left:
            size = path.stat().st_size
            with self._room:  # counted in the quota, whatever it is now
                self._pending += 1
                self._pending_bytes += size
            self._queue.put(_Job(path, "(spool)", size))
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_CONN_OPEN, self._on_connection),
        ]
        try:
            self._server = ae.start_server(
                (self.host, self.port), block=False, evt_handlers=handlers, ssl_context=self.tls
            )
        except OSError as err:
            self._outputs.close()
            raise PrimisError(
                f"cannot listen on {self.host}:{self.port} ({err.strerror or err})"
            ) from None
        self._worker = threading.Thread(target=self._work, name="primis-share", daemon=True)
        self._worker.start()
        return self

    def stop(self, grace: float = 10.0) -> NodeStats:
        """Stop as the module docstring says: no new associations, queued instances shared and
        answered, open associations given ``grace`` seconds to be released, then aborted; the
        manifests are compacted. Returns what the node did."""
        if self._server is None:
            return self.stats
        server, self._server = self._server, None
        server.shutdown()
        with self._lock:
            self._stopping = True
            self._queue.put(None)
        self._worker.join()
        deadline = time.monotonic() + grace
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for association in server.active_associations:
            association.abort()
        self._outputs.close()
        return self.stats

    def serve(self, say: Callable[[str], None]) -> NodeStats:
        """What `primis serve` does: start, ``say`` where the node listens, run until SIGTERM
        or SIGINT (Ctrl-C), then stop cleanly (`stop`), ``say`` what it did and return it."""
        import signal

        self.start()
        stopped = threading.Event()
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, lambda *_: stopped.set())
        host, port = self.address
        security = "plain TCP" if self.tls is None else "TLS"
        if self.tls is not None and self.tls.verify_mode == ssl.CERT_REQUIRED:
            security += " with client certificates"
        say(
            f"listening as {self.ae_title} on {host}:{port} ({security})"
            + (f" for {', '.join(self.allow)}" if self.allow else "")
            + f"; public files -> {self.public_dir}, keys -> {self.key_dir}"
        )
        while not stopped.wait(0.5):
            pass
        say("stopping: sharing what is queued")
        stats = self.stop()
        say(
            f"stopped: {stats.received} received, {stats.stored} shared, "
            f"{stats.duplicates} already shared, {stats.failed} failed, {stats.refused} refused"
        )
        return stats

    def __enter__(self) -> DicomNode:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + 1)

    def _refuse(self, calling_ae: str, why: str) -> int:
        self._count("refused")
        LOG.warning("refused an instance from %s (0x%04X): %s", calling_ae, OUT_OF_RESOURCES, why)
        return OUT_OF_RESOURCES

    def _on_connection(self, event) -> None:
        """Bound what the new connection's reads may buffer (`_BoundedReads`); this runs
        before the association's thread reads anything."""
        sock = event.assoc.dul.socket
        with contextlib.suppress(OSError, AttributeError):
            sock.socket.settimeout(READ_TIMEOUT)  # a peer silent this long mid-PDU is dropped
        peer = str(event.address[0]) if event.address else "unknown"
        sock.recv = _BoundedReads(sock.recv, self.max_pdu_bytes, self.max_instance_bytes, peer)

    def _on_accepted(self, event) -> None:
        """Log who associated: calling AE title, address, and over TLS the protocol, cipher
        and the client certificate's subject."""
        how = "plain TCP"
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if isinstance(sock, ssl.SSLSocket):
            cipher = sock.cipher()
            how = f"{sock.version()} {cipher[0] if cipher else ''}".strip()
            peer = sock.getpeercert()
            if peer:
                subject = ", ".join(f"{k}={v}" for part in peer.get("subject", ()) for k, v in part)
                how += f", client certificate {subject}"
        LOG.info(
            "association from AE %r at %s (%s)",
            event.assoc.requestor.ae_title,
            event.assoc.requestor.address,
            how,
        )

    def _on_rejected(self, event) -> None:
        title = event.assoc.requestor.ae_title
        if self.allow and title.strip() not in self.allow:
            why = "calling AE title not allowed"
        else:
            why = f"e.g. more than {self.max_associations} associations at once"
        LOG.warning(
            "rejected an association from AE %r at %s: %s",
            title,
            event.assoc.requestor.address,
            why,
        )

    def _reserve(self, size: int) -> str | None:
        """Take room in the spool for an instance of ``size`` bytes, waiting up to
        ``queue_timeout`` seconds; None, or why there is none."""
        if size > self.spool_max_bytes:
            return f"{size} B is more than the spool quota ({self.spool_max_bytes} B)"
        deadline = time.monotonic() + self.queue_timeout
        with self._room:
            while (
                self._pending >= self.queue_size
                or self._pending_bytes + size > self.spool_max_bytes
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    return (
                        f"spool full ({self._pending} instances, {self._pending_bytes} B "
                        f"waiting to be shared) for {self.queue_timeout:g} s"
                    )
                self._room.wait(left)
            self._pending += 1
            self._pending_bytes += size
        return None

    def _free(self, size: int) -> None:
        with self._room:
            self._pending -= 1
            self._pending_bytes -= size
            self._room.notify_all()

    def _on_store(self, event) -> int:
        """The C-STORE handler (one thread per association): take room in the spool, spool,
        check the header, queue; answer now (after-spool) or once shared (after-share)."""
        calling_ae = event.assoc.requestor.ae_title
        data = event.encoded_dataset()
        why = self._reserve(len(data))
        if why is not None:
            return self._refuse(calling_ae, why)
        job = _Job(self.spool_dir / f"{secrets.token_hex(8)}.dcm", calling_ae, len(data))
        queued = False
        try:
            if self._stopping:
                return self._refuse(calling_ae, "the node is stopping")
            try:
                write_atomic(job.path, data, 0o600)
                sync_folder(self.spool_dir)
            except OSError as err:
                return self._refuse(calling_ae, f"cannot spool it: {describe_os_error(err)}")
            del data
            self._count("received")
            if self.ack == "after-spool":
                try:  # what can fail fast fails with a status, not after the answer
                    check_dicom_header(job.path)
                except PrimisError as err:
                    return self._fail(job, CANNOT_UNDERSTAND, one_line(err), "unknown")
            with self._lock:
                queued = not self._stopping
                if queued:
                    self._queue.put(job)
            if not queued:
                job.path.unlink(missing_ok=True)
                return self._refuse(calling_ae, "the node is stopping")
        finally:
            if not queued:
                self._free(job.size)
        if self.ack == "after-spool":
            LOG.info("acknowledged instance %s from %s once spooled", job.path.stem, calling_ae)
            return SUCCESS
        return self._wait(job)

    def _work(self) -> None:
        """The worker: share queued instances one at a time until the None that `stop` queues.
        Whatever goes wrong with one instance (a bug included) answers that instance with a
        failure status; the worker goes on with the next."""
        while (job := self._queue.get()) is not None:
            try:
                job.status = self._share(job)
            except Exception as err:  # a bug past _share's own handling: never kill the worker
                self._count("failed")
                job.status = PROCESSING_FAILURE
                LOG.error(
                    "failed instance %s from %s (0x%04X): %s",
                    job.path.stem,
                    job.calling_ae,
                    PROCESSING_FAILURE,
                    type(err).__name__,  # not the message: it may quote the data set
                )
                with contextlib.suppress(Exception):
                    self._set_aside(job, f"internal error ({type(err).__name__})")
            finally:
                self._free(job.size)
                job.done.set()

    def _wait(self, job: _Job) -> int:
        """Wait for the worker's answer for ``job``: its status, or 0x0110 Processing Failure
        when the worker is gone, or 0xA700 when ``answer_timeout`` passes first (the instance
        stays queued and spooled; a retry is acknowledged once it is shared)."""
        deadline = time.monotonic() + self.answer_timeout
        while not job.done.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
            if self._worker is None or not self._worker.is_alive():
                self._count("failed")
                LOG.error(
                    "no worker to share instance %s: answering 0x%04X",
                    job.path.stem,
                    PROCESSING_FAILURE,
                )
                return PROCESSING_FAILURE
            if time.monotonic() >= deadline:
                return self._refuse(
                    job.calling_ae, f"not shared within {self.answer_timeout:g} s; still queued"
                )
        return job.status

    def _share(self, job: _Job) -> int:
        """Share one spooled instance; its status for the sender."""
        started = time.perf_counter()
        spool_id, what = job.path.stem, "unknown SOP class"
        try:
            uid, what = _instance(job.path)
            source = self._source(uid, content_fingerprint(job.path), spool_id)
            done = share_into(self._outputs, job.path, self.model, self.settings, source=source)
            for folder in {self.public_dir, self.key_dir}:
                sync_folder(folder)
        except OSError as err:
            self._count("failed")
            LOG.error(
                "failed instance %s (%s) from %s (0x%04X): %s; kept in the spool for a restart",
                spool_id,
                what,
                job.calling_ae,
                OUT_OF_RESOURCES,
                describe_os_error(err),
            )
            return OUT_OF_RESOURCES
        except Exception as err:  # PrimisError: not shareable; anything else: a bug
            status = CANNOT_UNDERSTAND if isinstance(err, PrimisError) else PROCESSING_FAILURE
            return self._fail(job, status, one_line(err), what)
        job.path.unlink()
        if done is None:
            self._count("duplicates")
            file_id = self._outputs.known[source]["file_id"]
            LOG.info(
                "instance %s (%s) from %s: already shared as file id %s",
                spool_id,
                what,
                job.calling_ae,
                file_id,
            )
        else:
            self._count("stored")
            LOG.info(
                "shared instance %s (%s) from %s as file id %s: public %d B, key %d B, %.2f s",
                spool_id,
                what,
                job.calling_ae,
                done.file_id,
                done.public_bytes,
                done.key_bytes,
                time.perf_counter() - started,
            )
        return SUCCESS

    def _source(self, uid: str, fingerprint: str, spool_id: str) -> str:
        """How the private manifest names a received instance: its SOP Instance UID and the
        fingerprint of its content (`content_fingerprint`), so that an instance sent again with
        the same content is a duplicate, and one with a known UID but other content (a
        correction, or someone claiming the UID) is shared as a new file. The conflict is
        logged by spool id, without identifiers. A record from before fingerprints (the UID
        alone) counts as the same content."""
        legacy, source = f"dicom-instance:{uid}", f"dicom-instance:{uid}#{fingerprint}"
        if legacy in self._outputs.known:
            return legacy
        if source not in self._outputs.known and any(
            known.startswith(legacy + "#") for known in self._outputs.known
        ):
            LOG.warning(
                "instance %s: its SOP Instance UID was received before with other content "
                "(pixels or how they are shown); shared as a new file",
                spool_id,
            )
        return source

    def _fail(self, job: _Job, status: int, reason: str, what: str) -> int:
        """Count and log an instance that cannot be shared, move it to SPOOL/failed/, and
        return ``status``."""
        self._count("failed")
        self._set_aside(job, reason)
        LOG.error(
            "failed instance %s (%s) from %s (0x%04X): %s; moved to %s",
            job.path.stem,
            what,
            job.calling_ae,
            status,
            reason,
            self.spool_dir / "failed",
        )
        return status

    def _set_aside(self, job: _Job, reason: str) -> None:
        """Move a spooled instance that cannot be shared to SPOOL/failed/, the reason beside
        it (best effort: a full disk leaves it in the spool)."""
        failed = _private_folder(self.spool_dir / "failed")
        with contextlib.suppress(OSError):
            note = f"from {job.calling_ae} at {time.strftime('%Y-%m-%dT%H:%M:%S')}: {reason}\n"
            write_atomic(failed / f"{job.path.stem}.txt", note.encode(), 0o600)
            os.replace(job.path, failed / job.path.name)
        self._prune_failed()

    def _prune_failed(self) -> None:
        """Apply the retention rule to SPOOL/failed/: keep at most ``failed_keep`` instances
        (the newest), none older than ``failed_days``; the log says how many went, nothing of
        what they held."""
        failed = self.spool_dir / "failed"
        if not failed.is_dir():
            return
        with contextlib.suppress(OSError):
            kept = sorted(failed.glob("*.dcm"), key=lambda p: p.stat().st_mtime, reverse=True)
            cutoff = time.time() - self.failed_days * 86400
            gone = [
                p for n, p in enumerate(kept) if n >= self.failed_keep or p.stat().st_mtime < cutoff
            ]
            for path in gone:
                path.unlink(missing_ok=True)
                path.with_suffix(".txt").unlink(missing_ok=True)
            if gone:
                LOG.info("deleted %d failed instance(s) past the retention rule", len(gone))


def _instance(path: Path) -> tuple[str, str]:
    """A spooled instance's SOP Instance UID and its SOP class's name, from its file meta."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        return str(meta.MediaStorageSOPInstanceUID), meta.MediaStorageSOPClassUID.name
    except (InvalidDicomError, AttributeError, ValueError):
        raise PrimisError(f"{path}: not a DICOM instance with file meta") from None


class StorageClient:
    """An association with a DICOM node (a Storage SCP, e.g. a PACS) for sending instances by
    C-STORE; used as a context manager::

        with StorageClient("pacs.example.org", 104, "PACS") as pacs:
            pacs.send(dicom_bytes, "name for messages")

    Every storage SOP class pynetdicom knows is proposed in Explicit VR Little Endian, the
    transfer syntax of PRIMIS's DICOM outputs. ``timeout`` bounds each wait for the peer.
    ``tls`` (`client_tls`) sends over TLS, the peer's certificate checked for ``host``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        called_ae: str,
        calling_ae: str = "PRIMIS",
        timeout: float = 60.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.called_ae, self.calling_ae = check_ae_title(called_ae), check_ae_title(calling_ae)
        self.host, self.port, self.timeout, self.tls = host, port, timeout, tls
        self._association = None

    def __enter__(self) -> StorageClient:
        from pydicom.uid import ExplicitVRLittleEndian
        from pynetdicom import AE, StoragePresentationContexts

        ae = AE(self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        for context in StoragePresentationContexts:
            ae.add_requested_context(context.abstract_syntax, ExplicitVRLittleEndian)
        tls_args = (self.tls, self.host) if self.tls is not None else None
        association = ae.associate(self.host, self.port, ae_title=self.called_ae, tls_args=tls_args)
        if not association.is_established:
            why = "rejected" if association.is_rejected else "no answer, or aborted"
            peer = f"{self.called_ae} at {self.host}:{self.port}"
            raise PrimisError(f"cannot associate with {peer} ({why})")
        self._association = association
        return self

    def __exit__(self, *exc) -> None:
        if self._association is not None and self._association.is_established:
            self._association.release()
        self._association = None

    def send(self, data: bytes, name: str) -> int:
        """Send one DICOM file's bytes by C-STORE; return the status (success or a warning),
        or raise PrimisError naming ``name`` when the peer refused it or did not answer."""
        import io

        import pydicom

        if self._association is None or not self._association.is_established:
            raise PrimisError(f"{name}: the association with {self.called_ae} was lost")
        dataset = pydicom.dcmread(io.BytesIO(data))
        try:
            answer = self._association.send_c_store(dataset)
        except ValueError:
            sop_class = dataset.SOPClassUID.name
            raise PrimisError(f"{name}: {self.called_ae} accepts no {sop_class}") from None
        if "Status" not in answer:
            raise PrimisError(f"{name}: no answer to C-STORE from {self.called_ae}")
        status = int(answer.Status)
        if status != SUCCESS and status not in STORE_WARNINGS:
            raise PrimisError(f"{name}: {self.called_ae} answered C-STORE with 0x{status:04X}")
        return status


def restore_to(
    public_path: str | os.PathLike,
    key_dir: str | os.PathLike,
    client: StorageClient,
    model: ModelLike = None,
    *,
    identity=None,
    passphrase: str | None = None,
) -> int:
    """Restore a public file with its key (`primis.api.restore_dicom`: DICOM, the original
    header where the key holds it) and send it by C-STORE through ``client``, without writing
    it anywhere; return the C-STORE status. Wrapped keys open with ``identity`` or
    ``passphrase``."""
    data = restore_dicom(public_path, key_dir, model, identity=identity, passphrase=passphrase)
    return client.send(data, str(public_path))
