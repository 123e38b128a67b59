"""TLS for percept's gRPC servers and clients, from PEM files.

A server's certificate chain, private key and client CA (``--tls-cert``, ``--tls-key``,
``--tls-client-ca``) are checked when it starts: a missing or unreadable file, one that is
not PEM, an encrypted key, a key that does not belong to the certificate, or a certificate
that has expired or is not valid yet stops it with a message that names the file. gRPC
asks :class:`ServerCredentials` for them again before each TLS handshake, and they are read
again whenever one of the files has changed (a rotated Kubernetes Secret), so new
connections get the new certificate without a restart. A rotation caught half-way (a new
certificate with the old key) or a bad new file leaves the previous credentials in use,
with one ERROR line per state of the files.

Clients (the CLI, search's channel to the embedding service) describe theirs with
:class:`ClientTls`; :func:`connection_hint` turns gRPC's handshake failures into advice.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import grpc

if TYPE_CHECKING:  # cryptography loads where certificates are read: a plaintext CLI call
    from cryptography import x509  # does not wait for it

log = logging.getLogger("percept.tls")

#: What an environment variable that turns something on says.
TRUTHY = frozenset({"1", "true", "yes", "on"})

#: A certificate that expires sooner than this is warned of (once).
EXPIRY_WARNING = datetime.timedelta(days=7)
#: A certificate is taken this long before its notBefore: a renewal issued a moment ago
#: by a machine whose clock runs ahead of this one's.
NOT_BEFORE_LEEWAY = datetime.timedelta(minutes=5)
#: Files refused (not valid yet, half rotated) are read again this often while unchanged.
RETRY_REFUSED_SECONDS = 60.0

Clock = Callable[[], datetime.datetime]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class TlsError(ValueError):
    """A PEM file that cannot be used; the message names it and says why."""


def read_pem(path: str, what: str) -> bytes:
    """The bytes of the PEM file at ``path`` (``what`` names it in errors: "--tls-key")."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise TlsError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise TlsError(f"{what} {path}: a folder, not a PEM file") from None
    except PermissionError:
        raise TlsError(f"{what} {path}: not readable by this process (permissions)") from None
    except OSError as error:
        raise TlsError(f"{what} {path}: {error.strerror}") from None
    if b"-----BEGIN " not in data:
        tool = "pkey" if what.endswith("-key") else "x509"
        raise TlsError(f"{what} {path}: not PEM (no '-----BEGIN' line); a DER file converts "
                       f"with `openssl {tool} -inform der -in FILE -out FILE.pem`")
    return data


def certificates(data: bytes, path: str, what: str) -> list[x509.Certificate]:
    """The certificates of a PEM file, leaf first; TlsError when it holds none."""
    from cryptography import x509

    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError as error:
        raise TlsError(f"{what} {path}: no readable certificate ({error})") from None
    if not found:
        raise TlsError(f"{what} {path}: no certificate")
    return found


def _public_key_der(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo))


def check_key_pair(leaf: x509.Certificate, key_pem: bytes, cert_what: str, cert_path: str,
                   key_what: str, key_path: str) -> None:
    """TlsError unless ``key_pem`` is an unencrypted private key of ``leaf``."""
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:  # "Password was not given but private key is encrypted"
        raise TlsError(f"{key_what} {key_path}: the key is encrypted; gRPC needs it "
                       "unencrypted (`openssl pkey -in KEY -out KEY.plain`), kept readable "
                       "by this process only") from None
    except (ValueError, Exception) as error:  # cryptography raises several kinds here
        raise TlsError(f"{key_what} {key_path}: not a readable private key ({error})") from None
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import PublicKeyAlgorithmOID

    # what gRPC's TLS (BoringSSL, its default groups and signature algorithms) serves and
    # presents: P-521, Ed25519 and RSA-PSS keys load, and then every handshake fails
    is_pss = leaf.public_key_algorithm_oid == PublicKeyAlgorithmOID.RSASSA_PSS
    if is_pss or not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)) or (
            isinstance(key, ec.EllipticCurvePrivateKey)
            and key.curve.name not in ("secp256r1", "secp384r1")):
        kind = "RSA-PSS" if is_pss else (
            getattr(getattr(key, "curve", None), "name", None) or type(key).__name__)
        raise TlsError(f"{key_what} {key_path}: gRPC's TLS does not take its key type "
                       f"({kind}): use RSA or ECDSA P-256/P-384")
    if _public_key_der(key.public_key()) != _public_key_der(leaf.public_key()):
        raise TlsError(f"{key_what} {key_path} is not the private key of the certificate in "
                       f"{cert_what} {cert_path} (a rotation half-way, or the wrong pair?)")


def _utc(moment: datetime.datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


def check_validity(leaf: x509.Certificate, what: str, path: str,
                   now: datetime.datetime) -> None:
    """TlsError when ``now`` lies outside the certificate's validity (taken
    :data:`NOT_BEFORE_LEEWAY` early)."""
    if now + NOT_BEFORE_LEEWAY < leaf.not_valid_before_utc:
        raise TlsError(f"{what} {path}: not valid until {_utc(leaf.not_valid_before_utc)} "
                       f"(this machine's clock says {_utc(now)})")
    if now > leaf.not_valid_after_utc:
        raise TlsError(f"{what} {path}: expired on {_utc(leaf.not_valid_after_utc)}")


def subject_name(certificate: x509.Certificate) -> str:
    """The certificate's common name, else its whole subject."""
    from cryptography.x509.oid import NameOID

    common = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(common[0].value) if common else certificate.subject.rfc4514_string()


def dns_and_ip_names(certificate: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses the certificate is valid for (subjectAltName)."""
    from cryptography import x509

    try:
        names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*names.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in names.get_values_for_type(x509.IPAddress))]


@dataclass(frozen=True)
class ServerTls:
    """What a server's TLS files held when they were read and checked."""

    cert_pem: bytes
    key_pem: bytes
    client_ca_pem: bytes | None
    leaf: x509.Certificate

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key_pem, self.cert_pem)], root_certificates=self.client_ca_pem)

    def describe(self) -> dict[str, Any]:
        """The certificate, for log lines."""
        return {"subject": subject_name(self.leaf),
                "names": ",".join(dns_and_ip_names(self.leaf)),
                "expires": f"{self.leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
                "mutual_tls": self.client_ca_pem is not None}


@dataclass(frozen=True)
class ServerTlsFiles:
    """The PEM files of a server's TLS: ``--tls-cert``, ``--tls-key``, ``--tls-client-ca``
    (empty: clients need no certificate)."""

    cert: str
    key: str
    client_ca: str = ""

    def paths(self) -> list[str]:
        return [path for path in (self.cert, self.key, self.client_ca) if path]

    def load(self, now: datetime.datetime) -> ServerTls:
        """The files' contents, checked; TlsError naming the first fault."""
        cert_pem = read_pem(self.cert, "--tls-cert")
        key_pem = read_pem(self.key, "--tls-key")
        leaf = certificates(cert_pem, self.cert, "--tls-cert")[0]
        check_key_pair(leaf, key_pem, "--tls-cert", self.cert, "--tls-key", self.key)
        check_validity(leaf, "--tls-cert", self.cert, now)
        client_ca_pem = None
        if self.client_ca:
            client_ca_pem = read_pem(self.client_ca, "--tls-client-ca")
            certificates(client_ca_pem, self.client_ca, "--tls-client-ca")
        return ServerTls(cert_pem, key_pem, client_ca_pem, leaf)


Stamp = bytes
#: A stamp no files have.
NEVER = object()


def file_stamps(paths: list[str]) -> Stamp | None:
    """A digest of the files' contents: what changes when any of them is replaced or
    rewritten in place (a Secret's atomic symlink swap, or a copy over it within one tick
    of the file system's clock, same size and all); None while one of them is missing.
    The files are small: reading them before each handshake costs microseconds."""
    digest = hashlib.sha256()
    try:
        for path in paths:
            data = Path(path).read_bytes()
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    except OSError:
        return None
    return digest.digest()


class FileWatch:
    """When a set of TLS files is worth reading again: they changed since they were last
    taken, and they are not files refused less than :data:`RETRY_REFUSED_SECONDS` ago (a
    renewal a clock's skew ahead becomes valid later). What reads them says whether it
    took or refused them; a refusal is to be logged once per state of the files."""

    def __init__(self, paths: list[str],
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.paths = paths
        self._monotonic = monotonic
        self._taken = file_stamps(paths)
        #: the state of the files last refused (None: one was missing; NEVER: none), when
        self._refused: Stamp | object | None = NEVER
        self._refused_at = 0.0

    def look(self) -> tuple[bool, Stamp | None]:
        """Whether the files are worth reading now, and their state to report back."""
        stamp = file_stamps(self.paths)
        if stamp == self._taken:
            return False, stamp
        if stamp == self._refused and (self._monotonic() - self._refused_at
                                       < RETRY_REFUSED_SECONDS):
            return False, stamp
        return True, stamp

    def took(self, stamp: Stamp | None) -> None:
        # a file missing at the look but read since: its state now
        self._taken = stamp if stamp is not None else file_stamps(self.paths)
        self._refused = NEVER

    def refused(self, stamp: Stamp | None) -> bool:
        """Records a refusal; whether it is the first of this state of the files (to
        log)."""
        first = stamp != self._refused
        self._refused, self._refused_at = stamp, self._monotonic()
        return first


class ServerCredentials:
    """A server's TLS credentials, read again when their files change.

    gRPC calls :meth:`_fetch` (on one of its threads) before each TLS handshake: it
    digests the files (about 50 us for three small ones) and, when they changed, checks
    them; new credentials apply to
    the connections made from then on, those already open keep theirs. The server also
    calls :meth:`refresh` every minute, so that an idle server's expiry metric and
    warnings follow its files too. Files that cannot be used are tried again each
    :data:`RETRY_REFUSED_SECONDS` (a renewal a clock's skew ahead becomes valid), with
    one ERROR per state of the files."""

    def __init__(self, files: ServerTlsFiles, clock: Clock = _now,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.files = files
        self._clock = clock
        self._lock = threading.Lock()
        self._watch = FileWatch(files.paths(), monotonic)
        self.current = files.load(clock())  # TlsError: the server does not start
        #: what gRPC was last given (it asks before each handshake)
        self._given = self.current
        self._warned: int | None = None  # the serial number last warned of
        self._loaded(self.current, "TLS certificate loaded")

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._given.configuration(), self._fetch,
            require_client_authentication=bool(self.files.client_ca))

    def _loaded(self, tls: ServerTls, message: str) -> None:
        from services.common.metrics import TLS_CERTIFICATE_EXPIRY

        TLS_CERTIFICATE_EXPIRY.labels("server").set(tls.leaf.not_valid_after_utc.timestamp())
        log.info(message, extra=tls.describe())
        self._warn_if_expiring(tls)

    def _warn_if_expiring(self, tls: ServerTls) -> None:
        """One WARNING per certificate, once fewer than :data:`EXPIRY_WARNING` are left."""
        left = tls.leaf.not_valid_after_utc - self._clock()
        if left < EXPIRY_WARNING and self._warned != tls.leaf.serial_number:
            self._warned = tls.leaf.serial_number
            log.warning("the TLS certificate expires soon: renew it (the server reads the "
                        "new files without a restart)",
                        extra={**tls.describe(), "hours_left": round(left.total_seconds()
                                                                     / 3600, 1)})

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's question before a handshake: new credentials, or None to keep these.
        Never raises (an exception here would fail the handshake)."""
        try:
            with self._lock:
                self._reload_if_changed()
                if self.current is self._given:
                    return None
                self._given = self.current
                return self._given.configuration()
        except Exception:  # a bug: keep serving with what there is
            log.exception("reading the TLS files again failed; the previous ones stay")
            return None

    def refresh(self) -> None:
        """Reads the files again if they changed (gRPC gets them at the next handshake),
        and warns of a certificate about to expire."""
        with self._lock:
            self._reload_if_changed()
            self._warn_if_expiring(self.current)

    def _reload_if_changed(self) -> None:
        """Under the lock: ``current`` from the files, if they changed and can be used."""
        worth, stamp = self._watch.look()
        if not worth:
            return
        try:
            loaded = self.files.load(self._clock())  # a missing file is named
        except TlsError as error:
            if self._watch.refused(stamp):
                log.error("the TLS files changed but cannot be used; the previous "
                          "certificate stays in use", extra={"why": str(error)})
            return
        self._watch.took(stamp)
        self.current = loaded
        self._loaded(loaded, "TLS certificate reloaded")


#: How often a server reads its TLS files again without a handshake asking.
REFRESH_SECONDS = 60.0


async def refresh_every(credentials: ServerCredentials,
                        seconds: float = REFRESH_SECONDS) -> None:
    """:meth:`ServerCredentials.refresh` every ``seconds``, off the event loop, until
    cancelled."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await asyncio.to_thread(credentials.refresh)
        except Exception:  # a bug: the next pass tries again, handshakes still ask
            log.exception("reading the TLS files again failed; the previous ones stay")


@dataclass(frozen=True)
class ClientTlsFiles:
    """What a client's TLS files held when they were read and checked."""

    root_pem: bytes | None
    cert_pem: bytes | None = None
    key_pem: bytes | None = None
    leaf: x509.Certificate | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.root_pem,
                                            private_key=self.key_pem,
                                            certificate_chain=self.cert_pem)


class ClientFlags(NamedTuple):
    """The flags a client's TLS settings come from, for its errors and advice."""

    ca: str
    cert: str
    key: str
    server_name: str  # "" where there is none


#: The CLI's (services/cli.py).
CLI_FLAGS = ClientFlags("--tls-ca", "--tls-client-cert", "--tls-client-key",
                        "--tls-server-name")
#: search's, for its channel to the embedding service (services/common/config.py).
EMBED_FLAGS = ClientFlags("--embed-tls-ca", "--embed-tls-cert", "--embed-tls-key", "")


#: The environment variables a client's TLS settings come from, by ClientTls field.
CLIENT_ENV = {"ca": "PERCEPT_TLS_CA", "cert": "PERCEPT_TLS_CLIENT_CERT",
              "key": "PERCEPT_TLS_CLIENT_KEY", "server_name": "PERCEPT_TLS_SERVER_NAME"}


@dataclass(frozen=True)
class ClientTls:
    """How a client reaches a TLS server: ``ca`` (PEM CA certificates that verify the
    server; empty = gRPC's bundled public roots), ``cert`` and ``key`` (a client
    certificate, for mutual TLS), ``server_name`` (the name to expect in the server's
    certificate, when the target address is not it). ``enabled`` is false for
    plaintext."""

    enabled: bool = False
    ca: str = ""
    cert: str = ""
    key: str = ""
    server_name: str = ""

    @classmethod
    def of(cls, ca: str = "", cert: str = "", key: str = "", server_name: str = "",
           tls: bool = False) -> ClientTls:
        """TLS when ``tls`` or any file or name is given; TlsError for a certificate
        without its key or the other way round."""
        if bool(cert) != bool(key):
            given, lacking = ("certificate", "key") if cert else ("key", "certificate")
            raise TlsError(f"a client {given} needs its {lacking} too")
        return cls(bool(tls or ca or cert or key or server_name), ca, cert, key, server_name)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ, tls: bool = False,
                         **given: str | None) -> ClientTls:
        """From ``PERCEPT_TLS`` (1/true/yes/on) and the variables of :data:`CLIENT_ENV`,
        each under a value ``given`` for its field (the CLI's flags) or ``tls``."""
        values = {field: given.get(field) or environ.get(name, "")
                  for field, name in CLIENT_ENV.items()}
        return cls.of(**values, tls=tls or environ.get("PERCEPT_TLS", "").strip().lower()
                      in TRUTHY)

    def read(self, flags: ClientFlags = CLI_FLAGS,
             now: datetime.datetime | None = None) -> ClientTlsFiles:
        """The files read and checked (TlsError naming ``flags``)."""
        root = None
        if self.ca:
            root = read_pem(self.ca, flags.ca)
            certificates(root, self.ca, flags.ca)
        if not self.cert:
            return ClientTlsFiles(root)
        cert_pem, key_pem = read_pem(self.cert, flags.cert), read_pem(self.key, flags.key)
        leaf = certificates(cert_pem, self.cert, flags.cert)[0]
        check_key_pair(leaf, key_pem, flags.cert, self.cert, flags.key, self.key)
        check_validity(leaf, flags.cert, self.cert, now or _now())
        return ClientTlsFiles(root, cert_pem, key_pem, leaf)

    def channel_credentials(self, flags: ClientFlags = CLI_FLAGS,
                            now: datetime.datetime | None = None) -> grpc.ChannelCredentials:
        """The files read and checked (TlsError naming ``flags``), as gRPC credentials."""
        return self.read(flags, now).credentials()

    def channel_options(self) -> list[tuple[str, Any]]:
        return ([("grpc.ssl_target_name_override", self.server_name)]
                if self.enabled and self.server_name else [])


def connection_hint(details: str, tls: ClientTls, flags: ClientFlags = CLI_FLAGS) -> str:
    """Advice for a connection that failed on TLS, from gRPC's status details; "" when
    the failure does not look like one."""
    text = details.lower()
    if "wrong_version_number" in text or "wrong version number" in text:
        return ("the server answered in plaintext: it does not speak TLS (drop the TLS "
                "settings, or start it with --tls-cert and --tls-key)")
    if "certificate_verify_failed" in text or "certificate verify failed" in text:
        return ("the server's certificate is not signed by a CA this client trusts "
                f"({flags.ca}), or is outside its validity")
    if "hostname verification check failed" in text or (
            "peer name" in text and "not in peer certificate" in text):
        return ("the server's certificate does not name this address: connect by a name "
                "it lists" + (f", or pass {flags.server_name} NAME" if flags.server_name
                              else ""))
    closed = "socket closed" in text or "connection reset" in text
    if "certificate required" in text or "certificate_required" in text or (
            closed and tls.enabled and not tls.cert):
        return ("the server ended the TLS handshake: it may require a client certificate "
                f"(mutual TLS): pass {flags.cert} and {flags.key}")
    if closed and tls.enabled:
        return ("the server ended the TLS handshake: it may not accept this client "
                "certificate (not signed by a CA of its --tls-client-ca)")
    if closed:
        return (f"if the server speaks TLS, pass {flags.ca} CA.pem" +
                (" (or --tls for a publicly signed one)" if flags is CLI_FLAGS else ""))
    return ""
