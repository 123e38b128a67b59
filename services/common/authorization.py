"""Which clients may call which methods, by the names in their TLS certificates:
``--tls-authorize`` (mutual TLS only: the client's certificate is what names it).

The rules are ``METHOD=NAME[,NAME...]`` separated by ``;``. METHOD is a gRPC method path
without its leading slash (``percept.v1.ImageSearch/AddImages``) or a pattern of them
(``percept.v1.ImageSearch/*``: ``*``, ``?`` and ``[...]`` as in shell patterns); NAME is
a client certificate's common name or one of its subjectAltName DNS names, or a pattern
of them (``*.indexers.example.com``; ``*`` alone: any client the CA accepts). The first
rule whose METHOD matches the call decides; a method no rule matches is open to every
client the CA accepts. A refused call is answered PERMISSION_DENIED, reason
``CLIENT_NOT_AUTHORIZED``, before its request is read and before it takes a slot of
``--max-concurrent-rpcs``."""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from services.common.errors import STATUS_DETAILS_KEY, status_details
from services.common.request_ids import with_request_id
from services.common.rpc import log_failed_call

REASON = "CLIENT_NOT_AUTHORIZED"


@dataclass(frozen=True)
class Rule:
    """Who may call the methods ``method`` matches."""

    method: str
    names: tuple[str, ...]

    def allows(self, names: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern)
                   for pattern in self.names for name in names)


def parse_rules(text: str) -> list[Rule]:
    """The rules of ``--tls-authorize``; ValueError saying what is wrong with them."""
    rules = []
    for number, part in enumerate(text.split(";"), 1):
        if not part.strip():
            continue
        method, equals, names = part.partition("=")
        method = method.strip().lstrip("/")
        allowed = tuple(name.strip() for name in names.split(",") if name.strip())
        if not equals or not method or not allowed:
            raise ValueError(f"rule {number} {part.strip()!r} is not METHOD=NAME[,NAME...] "
                             "(e.g. percept.v1.ImageSearch/AddImages=indexer)")
        if "/" not in method:
            raise ValueError(f"rule {number}: {method!r} names no method: write "
                             "SERVICE/METHOD, e.g. percept.v1.ImageSearch/AddImages or "
                             "percept.v1.ImageSearch/*")
        rules.append(Rule(method, allowed))
    return rules


def client_names(context: grpc.aio.ServicerContext) -> list[str]:
    """The names of the verified client certificate of the call (common name, then the
    subjectAltName DNS names); empty without one."""
    auth = context.auth_context() or {}
    names = []
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth.get(key, ()):
            name = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            if name not in names:
                names.append(name)
    return names


Check = Callable[[grpc.aio.ServicerContext], Awaitable[None]]

#: The method handler kinds, with the factory that makes each.
_KINDS = (("unary_unary", grpc.unary_unary_rpc_method_handler),
          ("unary_stream", grpc.unary_stream_rpc_method_handler),
          ("stream_unary", grpc.stream_unary_rpc_method_handler),
          ("stream_stream", grpc.stream_stream_rpc_method_handler))


def guarded(handler: grpc.RpcMethodHandler, check: Check) -> grpc.RpcMethodHandler:
    """``handler`` with ``check(context)`` awaited before it runs (it aborts the call to
    refuse it)."""
    for kind, factory in _KINDS:
        behaviour = getattr(handler, kind)
        if behaviour is None:
            continue
        if inspect.isasyncgenfunction(behaviour):
            async def streamed(request: Any, context: grpc.aio.ServicerContext,
                               behaviour: Any = behaviour) -> Any:
                await check(context)
                async for response in behaviour(request, context):
                    yield response

            wrapped: Any = streamed
        else:
            async def answered(request: Any, context: grpc.aio.ServicerContext,
                               behaviour: Any = behaviour) -> Any:
                await check(context)
                return await behaviour(request, context)

            wrapped = answered
        return factory(wrapped, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)
    return handler


class Authorization(grpc.aio.ServerInterceptor):
    """Refuses the calls ``rules`` do not allow the client's certificate to make."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules

    def rule_for(self, method: str) -> Rule | None:
        path = method.lstrip("/")
        return next((rule for rule in self.rules
                     if fnmatch.fnmatchcase(path, rule.method)), None)

    async def intercept_service(self, continuation: Any,
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        rule = self.rule_for(method)
        if handler is None or rule is None:
            return handler

        async def check(context: grpc.aio.ServicerContext) -> None:
            names = client_names(context)
            if rule.allows(names):
                return
            who = (f"the client certificate of {', '.join(names)}" if names
                   else "a client without a certificate")
            message = (f"{who} may not call {method.lstrip('/')} (the server's "
                       "--tls-authorize)")
            log_failed_call(method, grpc.StatusCode.PERMISSION_DENIED, message,
                            reason=REASON)
            details = ((STATUS_DETAILS_KEY, status_details(
                grpc.StatusCode.PERMISSION_DENIED, message, REASON)),)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, message,
                                with_request_id(context, details))

        return guarded(handler, check)
