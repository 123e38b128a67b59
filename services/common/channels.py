"""gRPC channels to percept servers, in plaintext or over TLS (services/common/tls.py).

A long-lived client of a TLS server (search's channel to the embedding service) holds a
:class:`RenewingChannel`: its client certificate is read again when its files change
(a rotated Kubernetes Secret), as the servers' are, so it never outlives its certificate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from services.common.tls import (
    CLI_FLAGS,
    ClientFlags,
    ClientTls,
    ClientTlsFiles,
    FileWatch,
    TlsError,
)

log = logging.getLogger("percept.channels")

Options = Sequence[tuple[str, Any]]


def open_channel(target: str, options: Options, tls: ClientTls,
                 flags: ClientFlags = CLI_FLAGS) -> grpc.Channel:
    """A blocking channel; TlsError when the TLS files cannot be used."""
    if not tls.enabled:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, tls.channel_credentials(flags),
                               options=[*options, *tls.channel_options()])


def open_aio_channel(target: str, options: Options, tls: ClientTls,
                     flags: ClientFlags = CLI_FLAGS) -> grpc.aio.Channel:
    """An asyncio channel; TlsError when the TLS files cannot be used."""
    if not tls.enabled:
        return grpc.aio.insecure_channel(target, options=list(options))
    return _secure_aio_channel(target, options, tls, tls.read(flags))


def _secure_aio_channel(target: str, options: Options, tls: ClientTls,
                        files: ClientTlsFiles) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(target, files.credentials(),
                                   options=[*options, *tls.channel_options()])


class RenewingChannel:
    """An asyncio channel whose TLS files are looked at again every ``check_seconds``:
    when they changed, calls from then on go over a new channel with the new
    credentials, and the old one closes once its calls have ended (within
    ``close_grace`` seconds). Files that cannot be used (missing, not valid yet, half
    rotated) leave the old channel in use, with one ERROR line per state of the files,
    and are tried again each :data:`RETRY_REFUSED_SECONDS`. A plaintext channel never
    changes. The client certificate's expiry is exported as
    ``percept_tls_certificate_expiry_timestamp_seconds{certificate=...}``."""

    def __init__(self, target: str, options: Options, tls: ClientTls, flags: ClientFlags,
                 certificate: str = "embed-client", check_seconds: float = 10.0,
                 close_grace: float = 120.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.target, self.options, self.tls, self.flags = target, options, tls, flags
        self.certificate = certificate
        self.check_seconds, self.close_grace, self._clock = check_seconds, close_grace, clock
        self._watch = FileWatch([path for path in (tls.ca, tls.cert, tls.key) if path], clock)
        if tls.enabled:
            files = tls.read(flags)  # TlsError: the server does not start
            self.channel = _secure_aio_channel(target, options, tls, files)
            self._exported(files)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=list(options))
        self._checked = clock()
        self._closing: dict[asyncio.Task[None], grpc.aio.Channel] = {}
        self._closed = False
        #: channels made so far (1 + renewals)
        self.generation = 1

    def _exported(self, files: ClientTlsFiles) -> None:
        from services.common.metrics import TLS_CERTIFICATE_EXPIRY

        if files.leaf is not None:
            TLS_CERTIFICATE_EXPIRY.labels(self.certificate).set(
                files.leaf.not_valid_after_utc.timestamp())

    def current(self) -> grpc.aio.Channel:
        """The channel for the next call (a new one after the TLS files changed); called
        on the event loop the channel serves."""
        now = self._clock()
        if not self.tls.enabled or self._closed or now - self._checked < self.check_seconds:
            return self.channel
        self._checked = now
        worth, stamp = self._watch.look()
        if not worth:
            return self.channel
        loop = asyncio.get_running_loop()  # before anything changes
        try:
            files = self.tls.read(self.flags)
        except TlsError as error:
            if self._watch.refused(stamp):
                log.error("the client TLS files changed but cannot be used; the previous "
                          "credentials stay in use", extra={"target": self.target,
                                                            "why": str(error)})
            return self.channel
        old = self.channel
        self.channel = _secure_aio_channel(self.target, self.options, self.tls, files)
        self._watch.took(stamp)
        self.generation += 1
        self._exported(files)
        log.info("client TLS credentials reloaded", extra={"target": self.target})
        closing = loop.create_task(old.close(self.close_grace))
        self._closing[closing] = old
        closing.add_done_callback(self._closing.pop)
        return self.channel

    async def close(self) -> None:
        """Closes the channel, and the old ones still waiting on their calls, at once;
        no new channel is made after it."""
        self._closed = True
        await self.channel.close()
        for old in list(self._closing.values()):
            await old.close()
        await asyncio.gather(*self._closing, return_exceptions=True)
