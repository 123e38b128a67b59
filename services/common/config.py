"""Server configuration from command-line flags, with ``PERCEPT_*`` environment fallbacks.

A flag beats the environment, which beats the built-in default. The environment name of a
flag is ``PERCEPT_`` + the flag in upper case with dashes as underscores, so
``--max-batch`` reads ``PERCEPT_MAX_BATCH``. The Kubernetes ConfigMap sets these.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from training.assets import REPO_ROOT

#: ``--cpu-dtype`` choices: the precision image models (style, super-resolution) run in on a
#: CPU (services/common/device.py serving_dtype). On CUDA they run in float16.
CPU_DTYPES = ("auto", "float32", "bfloat16")

SERVICES = ("superres", "style", "embed", "search")
SERVICE_PORTS = {"all": 50050, "superres": 50051, "style": 50052, "embed": 50053, "search": 50054}
#: Each service's fully-qualified gRPC name (health, reflection) -> its short name.
SERVICE_FULL_NAMES = {"percept.v1.SuperResolution": "superres",
                      "percept.v1.StyleTransfer": "style", "percept.v1.Embedding": "embed",
                      "percept.v1.ImageSearch": "search"}
METRICS_PORT_OFFSET = 9100 - 50050  # all -> 9100, superres -> 9101, ...

T = TypeVar("T")


#: Calls to health, reflection and ServerInfo a process takes beside
#: ``--max-concurrent-rpcs``: gRPC's own limit, checked before any message is read, is the
#: sum of the two, so that calls to those cannot hold unbounded request bytes either. It
#: is large because health Watch streams stay open, one per client channel that checks
#: health (a client-side load balancer's subchannels): with 32, the 32nd such stream made
#: the kubelet's health Check fail while the work calls were at their limit.
INFRASTRUCTURE_CALLS = 1024


@dataclass(frozen=True)
class ServerConfig:
    """Everything a server process needs to know; built by :func:`config_from_args`."""

    service: str
    host: str = "0.0.0.0"
    port: int = 50050
    metrics_port: int = 9100
    models_dir: Path = REPO_ROOT / "models"
    data_dir: Path = REPO_ROOT / "data" / "search"
    device: str = "auto"
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 64
    max_message_mb: int = 64
    max_pixels: int = 64_000_000
    max_inflight_mpixels: int = 256
    max_concurrent_rpcs: int = 64
    fair_share: bool = True
    drain_seconds: float = 20.0
    stall_seconds: float = 120.0
    keepalive_seconds: float = 60.0
    min_client_ping_seconds: float = 10.0
    log_format: str = "json"
    log_level: str = "info"
    failed_call_log_limit: int = 20
    embed_target: str = ""
    max_iterations: int = 2000
    max_optimisations: int = 4
    default_model: str = ""
    compile: str = "auto"
    cuda_graphs: bool = True
    cpu_dtype: str = "auto"
    style_tile: int = 1088
    warmup: bool = True
    retain_memory: bool = True
    word_vectors: str = ""
    word_vectors_format: str = "auto"
    # search index: services/search/vector_index.py IndexSettings, chosen by make bench
    search_index: str = "hnsw"
    search_ann_threshold: int = 10_000
    search_nprobe: int = 128
    search_ef_search: int = 64
    # TLS (services/common/tls.py): PEM files; no certificate = plaintext
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    tls_authorize: str = ""
    health_port: int = 0
    embed_tls_ca: str = ""
    embed_tls_cert: str = ""
    embed_tls_key: str = ""

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    @property
    def services(self) -> tuple[str, ...]:
        """The services this process hosts (``all`` means every one)."""
        return SERVICES if self.service == "all" else (self.service,)

    def replace(self, **changes: Any) -> ServerConfig:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return ServerConfig(**values)


def _env_name(flag: str) -> str:
    return "PERCEPT_" + flag.lstrip("-").replace("-", "_").upper()


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def _positive(kind: Callable[[str], T]) -> Callable[[str], T]:
    def parse(text: str) -> T:
        value = kind(text)
        if value <= 0:  # type: ignore[operator]
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


#: Smallest --style-tile: tiles overlap by 64 px on each side (services/style/service.py),
#: and a smaller tile would mostly be overlap, its instance-norm statistics a sliver's.
MIN_STYLE_TILE = 256


def _number(text: str) -> float:
    """``text`` as a float; NaN (which every range check refuses) for one that is not."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def _non_negative(text: str) -> float:
    value = _number(text)
    if not 0 <= value < math.inf:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


#: The longest time a gRPC channel argument holds (2^31 - 1 ms), in whole seconds.
MAX_GRPC_SECONDS = (2**31 - 1) // 1000


def _seconds_within(low: float, text: str, never: bool) -> float:
    """``text`` as seconds from ``low`` to :data:`MAX_GRPC_SECONDS`, or 0 where ``never``."""
    value = _number(text)
    if never and value == 0:
        return 0.0
    if not low <= value <= MAX_GRPC_SECONDS:  # NaN fails too
        zero = "0 (never) or " if never else ""
        raise argparse.ArgumentTypeError(
            f"must be {zero}{low:g} to {MAX_GRPC_SECONDS:,} seconds, got {text}")
    return value


def _keepalive_seconds(text: str) -> float:
    return _seconds_within(1.0, text, never=True)


def _client_ping_seconds(text: str) -> float:
    """At least a second: gRPC's clients ping at most once a second anyway."""
    return _seconds_within(1.0, text, never=False)


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text}")
    return value


def _authorization_rules(text: str) -> str:
    from services.common.authorization import parse_rules

    try:
        parse_rules(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    return text


#: --log-level's choices (logging's level names, in lower case).
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _style_tile(text: str) -> int:
    value = int(text)
    if value < MIN_STYLE_TILE:
        raise argparse.ArgumentTypeError(f"must be >= {MIN_STYLE_TILE} px, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {text}")
    return value


_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


def _host(text: str) -> str:
    """``--host``: an IPv4 or IPv6 address (``::`` or ``[::]``) or a host name; stored bare,
    without an IPv6 literal's brackets (:func:`listen_address` adds them for gRPC). An IPv6
    address with a zone (``fe80::1%eth0``) is refused: /metrics cannot bind one."""
    host = bare_host(text.strip())
    if ":" in host:
        valid = _is_address(host, ipaddress.IPv6Address) and "%" not in host
    elif host.replace(".", "").isdigit():
        valid = _is_address(host, ipaddress.IPv4Address)
    else:
        valid = bool(_HOST_NAME.match(host))
    if not valid:
        raise argparse.ArgumentTypeError(
            f"not a host: {text!r}; give an address such as 0.0.0.0, :: or 127.0.0.1, or a "
            "host name (the port is --port; IPv6 zones such as %eth0 are not supported)")
    return host


def _is_address(host: str, kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address]
                ) -> bool:
    try:
        kind(host)
    except ValueError:
        return False
    return True


def listen_address(host: str, port: int) -> str:
    """The ``host:port`` gRPC binds, with an IPv6 literal in brackets (``[::]:50050``)."""
    host = bare_host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bare_host(host: str) -> str:
    """``host`` without an IPv6 literal's brackets, as sockets take it."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _env_default(flag: str, default: Any, kind: Callable[[str], Any],
                 choices: Sequence[str] | None, errors: list[str]) -> Any:
    """The value of the flag's environment variable, checked as the flag would be (its
    type and its choices); ``default`` when unset. A bad value is added to ``errors`` (for
    :func:`config_from_args` to refuse), not raised: the variables are read whenever the
    command line is built, for client commands as well, which do not use them."""
    raw = os.environ.get(_env_name(flag))
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except (ValueError, argparse.ArgumentTypeError) as error:
        errors.append(f"{_env_name(flag)}={raw!r}: {error}")
        return default
    if choices is not None and value not in choices:
        errors.append(f"{_env_name(flag)}={raw!r}: not one of {', '.join(choices)}")
        return default
    return value


class ConfigError(ValueError):
    """Server settings that cannot be used (from the environment: flags are checked by
    argparse)."""


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds every server flag (except the positional service name) to ``parser``."""
    base = ServerConfig(service="all")
    env_errors: list[str] = []
    parser.set_defaults(env_errors=env_errors)

    def add(flag: str, kind: Callable[[str], Any], default: Any, help_text: str,
            **extra: Any) -> None:
        value = _env_default(flag, default, kind, extra.get("choices"), env_errors)
        shown = ("on" if value else "off") if isinstance(value, bool) else "%(default)s"
        default_note = "" if value is None else f"; default {shown}"  # None: the help says
        parser.add_argument(flag, type=kind, default=value,
                            help=f"{help_text} (env {_env_name(flag)}{default_note})",
                            **extra)

    add("--host", _host, base.host,
        "address to bind: 0.0.0.0 (every IPv4 interface), :: (IPv6 and, where the "
        "system maps them, IPv4 too), 127.0.0.1, or a host name")
    add("--port", _port, None, "gRPC port; default: 50050 for all, 50051..50054 per service")
    add("--metrics-port", _port, None, "Prometheus /metrics port, 0 disables; default: 9100+")
    add("--models-dir", Path, base.models_dir, "folder of model artifacts")
    add("--data-dir", Path, base.data_dir, "where the search index lives")
    add("--device", str, base.device, "auto | cpu | cuda", choices=["auto", "cpu", "cuda"])
    add("--max-batch", _positive(int), base.max_batch, "largest micro-batch")
    add("--max-wait-ms", _non_negative, base.max_wait_ms, "longest wait to fill a micro-batch")
    add("--max-queue", _positive(int), base.max_queue,
        "requests queued per model before RESOURCE_EXHAUSTED")
    add("--max-message-mb", _positive(int), base.max_message_mb, "gRPC message size limit")
    add("--max-pixels", _positive(int), base.max_pixels, "largest accepted image, in pixels")
    add("--max-inflight-mpixels", _positive(int), base.max_inflight_mpixels,
        "megapixels (input plus output) of the image requests this process holds at once "
        "(style and super-resolution requests, and the embedding service's decodes) "
        "before RESOURCE_EXHAUSTED (busy); bounds its memory, about 8 bytes each on the "
        "CPU; one request is always admitted")
    add("--max-concurrent-rpcs", _positive(int), base.max_concurrent_rpcs,
        "calls to the model services this process handles at once; one more is refused "
        "busy (RESOURCE_EXHAUSTED with the retry trailer) before its request is read, so "
        f"the request bytes held stay under this (plus {INFRASTRUCTURE_CALLS:,} for health "
        "checks, reflection and ServerInfo) times --max-message-mb")
    add("--fair-share", _parse_bool, base.fair_share,
        "on | off: the clients (each client certificate, else each IP address) share "
        "--max-concurrent-rpcs: while others want calls, one at its share is answered "
        "busy, so that one client's flood cannot lock the others out")
    add("--drain-seconds", _non_negative, base.drain_seconds,
        "grace period for in-flight RPCs on SIGTERM; a call still running a moment before "
        "it ends is answered UNAVAILABLE (SERVER_DRAINING)")
    add("--stall-seconds", _non_negative, base.stall_seconds,
        "a model batch running longer than this (a hung GPU) turns the service's health "
        "and the server's ('', the liveness probe's) NOT_SERVING until it ends; 0 never "
        "(Gatys optimisations and torch.compile of a new shape are exempt)")
    add("--keepalive-seconds", _keepalive_seconds, base.keepalive_seconds,
        "the server pings a connection quiet for this long, and closes it when no answer "
        "comes within 20 s, or this if shorter (any ping of the server's must be answered "
        "that soon): a vanished client's streams end; 0 never, 1 at least")
    add("--min-client-ping-seconds", _client_ping_seconds, base.min_client_ping_seconds,
        "clients' keepalive pings are accepted this often, with or without calls in "
        "progress; a client pinging more often is disconnected (GOAWAY too_many_pings)")
    add("--log-format", str, base.log_format, "json | text", choices=["json", "text"])
    add("--log-level", str.lower, base.log_level, "debug | info | warning | error | critical",
        choices=LOG_LEVELS)
    add("--failed-call-log-limit", _count, base.failed_call_log_limit,
        "log lines each kind of failed call (method, code, reason) below ERROR writes "
        "every 10 s; the rest are counted, in one 'failed calls not logged' line; 0 = "
        "every one")
    add("--embed-target", str, base.embed_target,
        "search: address of the Embedding service; empty = in-process")
    add("--max-iterations", _positive(int), base.max_iterations,
        "style: most optimiser iterations a StylizeWithImage request may ask for")
    add("--max-optimisations", _positive(int), base.max_optimisations,
        "style: StylizeWithImage requests queued or running before RESOURCE_EXHAUSTED")
    add("--default-model", str, base.default_model,
        "superres: model used when a request names none")
    add("--compile", str, base.compile,
        "torch.compile image models: auto (on CUDA when --cuda-graphs is off), on, off",
        choices=["auto", "on", "off"])
    add("--cuda-graphs", _parse_bool, base.cuda_graphs,
        "on | off: on CUDA, replay image models from CUDA graphs, one captured per input "
        "shape that recurs; off launches every kernel from the host")
    add("--cpu-dtype", str, base.cpu_dtype,
        "precision of the style and super-resolution nets on a CPU: auto (bfloat16 where "
        "the CPU has native bfloat16 instructions, avx512_bf16 or amx_bf16; else float32), "
        "float32, bfloat16. On CUDA they run in float16", choices=list(CPU_DTYPES))
    add("--style-tile", _style_tile, base.style_tile,
        "style: tile side in pixels for fast style nets; larger images go through in "
        "overlapping tiles (memory grows with its square)")
    add("--warmup", _parse_bool, base.warmup,
        "on | off: run one warm-up inference before reporting SERVING")
    add("--retain-memory", _parse_bool, base.retain_memory,
        "glibc: keep memory freed by a forward pass for the next request (one malloc arena, "
        "no mmap below 1 GiB, no trim below 2 GiB) instead of returning it to the kernel "
        "and faulting it back in; off keeps glibc's defaults")
    add("--word-vectors", str, base.word_vectors,
        "embed: a word2vec/GloVe/fastText .vec file whose vectors replace the MiniLM noun "
        "vectors (text, nouns and DeViSE maps trained against that file); empty = MiniLM")
    add("--word-vectors-format", str, base.word_vectors_format,
        "embed: format of --word-vectors (auto reads it from the file)",
        choices=["auto", "word2vec", "word2vec-binary", "glove", "fasttext"])
    add("--search-index", str, base.search_index,
        "search: approximate index used from --search-ann-threshold vectors on",
        choices=["hnsw", "ivf"])
    add("--search-ann-threshold", _positive(int), base.search_ann_threshold,
        "search: exact search below this many vectors, --search-index from it on")
    add("--search-nprobe", _positive(int), base.search_nprobe,
        "search: IVF inverted lists searched per query")
    add("--search-ef-search", _positive(int), base.search_ef_search,
        "search: HNSW candidate list length per query")
    add("--tls-cert", str, base.tls_cert,
        "PEM certificate chain: serve gRPC over TLS (with --tls-key); re-read when the "
        "file changes (a rotated Kubernetes Secret); empty = plaintext")
    add("--tls-key", str, base.tls_key, "PEM private key of --tls-cert")
    add("--tls-client-ca", str, base.tls_client_ca,
        "PEM CA certificates: require every client to present a certificate they signed "
        "(mutual TLS); empty = any client")
    add("--tls-authorize", _authorization_rules, base.tls_authorize,
        "with --tls-client-ca: which clients may call which methods, by their "
        "certificate's names: 'SERVICE/METHOD=NAME[,NAME...]; ...' (shell patterns, e.g. "
        "'percept.v1.ImageSearch/AddImages=indexer;percept.v1.ImageSearch/DeleteImages="
        "admin'); the first rule that matches decides, a method none matches is open; "
        "empty = every client the CA accepts may call everything")
    add("--health-port", _port, base.health_port,
        "also answer grpc.health.v1 alone, in plaintext, on this port (the kubelet's gRPC "
        "probes speak no TLS); 0 = off")
    add("--embed-tls-ca", str, base.embed_tls_ca,
        "search: PEM CA certificates that verify the Embedding service's TLS certificate; "
        "setting this or --embed-tls-cert makes the call to --embed-target use TLS")
    add("--embed-tls-cert", str, base.embed_tls_cert,
        "search: PEM client certificate shown to the Embedding service (its "
        "--tls-client-ca), with --embed-tls-key")
    add("--embed-tls-key", str, base.embed_tls_key, "search: PEM private key of "
        "--embed-tls-cert")


def config_from_args(service: str, args: argparse.Namespace) -> ServerConfig:
    """Builds a ServerConfig for ``service`` from parsed flags; ConfigError naming every
    PERCEPT_* variable whose value the flag would refuse."""
    if getattr(args, "env_errors", None):
        raise ConfigError("; ".join(args.env_errors))
    if service not in (*SERVICES, "all"):
        raise ValueError(f"unknown service {service!r}; choose from all, {', '.join(SERVICES)}")
    port = args.port if args.port is not None else SERVICE_PORTS[service]
    metrics_port = args.metrics_port
    if metrics_port is None:
        metrics_port = SERVICE_PORTS[service] + METRICS_PORT_OFFSET
    values = {f.name: getattr(args, f.name) for f in fields(ServerConfig)
              if f.name not in {"service", "port", "metrics_port"} and hasattr(args, f.name)}
    config = ServerConfig(service=service, port=port, metrics_port=metrics_port, **values)
    problems = tls_problems(config)
    if problems:
        raise ConfigError("; ".join(problems))
    return config


def tls_problems(config: ServerConfig) -> list[str]:
    """What is wrong with the TLS and health-port settings together (the files
    themselves are checked when the server starts)."""
    problems = []
    if config.tls_cert and not config.tls_key:
        problems.append("--tls-cert needs --tls-key (its private key)")
    if config.tls_key and not config.tls_cert:
        problems.append("--tls-key needs --tls-cert (the certificate it belongs to)")
    if config.tls_client_ca and not config.tls_cert:
        problems.append("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key: "
                        "a plaintext server cannot ask for client certificates")
    if config.tls_authorize and not config.tls_client_ca:
        problems.append("--tls-authorize needs --tls-client-ca: the names it allows are "
                        "those of verified client certificates")
    if config.health_port and config.health_port in (config.port, config.metrics_port):
        problems.append(f"--health-port {config.health_port} is taken by --port or "
                        "--metrics-port: choose another")
    if bool(config.embed_tls_cert) != bool(config.embed_tls_key):
        problems.append("--embed-tls-cert and --embed-tls-key go together")
    embed_tls = config.embed_tls_ca or config.embed_tls_cert or config.embed_tls_key
    if embed_tls and not config.embed_target:
        problems.append("--embed-tls-* apply to the call to --embed-target, which is not "
                        "set (the embedding model runs in this process)")
    return problems
