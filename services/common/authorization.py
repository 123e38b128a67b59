"""Which clients may call which methods, by the names in their TLS certificates:
``--tls-authorize`` (mutual TLS only: the client's certificate is what names it).

The rules are ``METHOD=NAME[,NAME...]`` separated by ``;``. METHOD is a gRPC method path
without its leading slash (``percept.v1.ImageSearch/AddImages``) or a pattern of them
(``percept.v1.ImageSearch/*``: ``*``, ``?`` and ``[...]`` as in shell patterns, case
sensitive); NAME is a client certificate's common name or one of its subjectAltName DNS
names (not its URI, e-mail or IP names), or a pattern of them (``*.indexers.example.com``;
``*`` alone: any client the CA accepts). The first rule whose METHOD matches the call
decides; a method no rule matches is open to every client the CA accepts. At start, a
rule that matches no method the server serves, or that an earlier rule hides, is warned
of. A refused call is answered PERMISSION_DENIED, reason ``CLIENT_NOT_AUTHORIZED``; a
call to a model service is refused before its request is read and before it takes a
slot of ``--max-concurrent-rpcs`` (health, reflection and ServerInfo have their small
request read first)."""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from services.common.errors import STATUS_DETAILS_KEY, fit_status_message, status_details
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
    """The names of the verified client certificate of the call: its common name, then
    its subjectAltName DNS names (``peer_dns``; not its URI, e-mail or IP names, which a
    CA's policy on DNS names does not govern); empty without a certificate."""
    auth = context.auth_context() or {}
    names = []
    for key in ("x509_common_name", "peer_dns"):
        for value in auth.get(key, ()):
            name = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            if name and name not in names:
                names.append(name)
    return names


#: The most of a refused client's names its status message lists.
NAMES_SHOWN = 3


def _who(names: list[str]) -> str:
    if not names:
        return "a client certificate without a common name or DNS name"
    more = len(names) - NAMES_SHOWN
    shown = ", ".join(names[:NAMES_SHOWN]) + (f" and {more} more" if more > 0 else "")
    return f"the client certificate of {shown}"


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


def served_methods(service_names: list[str]) -> list[str]:
    """The method paths (``SERVICE/METHOD``) of the services a server registers, from the
    protobuf descriptors."""
    from google.protobuf import descriptor_pool

    pool = descriptor_pool.Default()
    methods = []
    for name in service_names:
        try:
            service = pool.FindServiceByName(name)
        except KeyError:
            continue
        methods += [f"{name}/{method.name}" for method in service.methods]
    return methods


class Authorization(grpc.aio.ServerInterceptor):
    """Refuses the calls ``rules`` do not allow the client's certificate to make."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules

    def problems(self, methods: list[str]) -> list[str]:
        """What is wrong with the rules on a server that serves ``methods``: a rule that
        matches none of them (a typo leaves the method it meant open), or one whose
        methods an earlier rule decides for all of them."""
        problems = []
        decided: set[str] = set()
        for number, rule in enumerate(self.rules, 1):
            matched = {m for m in methods if fnmatch.fnmatchcase(m, rule.method)}
            if not matched:
                problems.append(f"rule {number} ({rule.method}) matches no method this "
                                "server serves (names are case sensitive)")
            elif matched <= decided:
                problems.append(f"rule {number} ({rule.method}) never decides: earlier "
                                "rules match all of its methods first")
            decided |= matched
        return problems

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
            message = fit_status_message(f"{_who(names)} may not call "
                                         f"{method.lstrip('/')} (the server's --tls-authorize)")
            log_failed_call(method, grpc.StatusCode.PERMISSION_DENIED, message,
                            reason=REASON)
            details = ((STATUS_DETAILS_KEY, status_details(
                grpc.StatusCode.PERMISSION_DENIED, message, REASON)),)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, message,
                                with_request_id(context, details))

        return guarded(handler, check)
