"""``percept``: the client and operator command line.

Client commands talk to running services: ``--target host:port``, else ``$PERCEPT_TARGET``,
else a server on this machine (``percept serve all``'s port 50050, then the local
cluster's port for the service, 50051..50054, as ``make run`` starts them). A failed call
prints the gRPC status name and message on stderr (``INVALID_ARGUMENT: not a decodable
image``) and exits 1; a bad command line, an unreadable, empty or too large input, or an
unwritable output exits 2 before anything is sent. A busy server (RESOURCE_EXHAUSTED with
a retry trailer) is asked again after its pushback, until the command's timeout, and one
that is loading its models or draining (UNAVAILABLE, SERVER_LOADING / SERVER_DRAINING) for
up to a minute; with no server at the address, a command fails at once. Outputs are
written whole or not at all. ``upscale`` and ``stylize --style`` also take a folder of
images (IN and OUT are then folders).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import itertools
import json
import math
import os
import re
import shlex
import signal
import sys
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TypeVar

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc loads: no C-core INFO lines

import grpc

from percept.v1 import search_pb2, server_pb2
from services import client, folder_runs, local_files
from services.local_files import (
    Terminated,
    UsageError,
    atomic_output,
    read_image,
    sigterm_raises,
    size_text,
)
from services.retries import (
    NOT_READY_REASONS,
    UNAVAILABLE_PATIENCE_SECONDS,
    RetriedTooLong,
    retrying,
)

Handler = Callable[[argparse.Namespace], int]

T = TypeVar("T")

#: What a human-readable line never prints as it is: C0 and C1 controls and DEL (an ESC
#: starts a terminal escape sequence, a CR rewrites the line), the line and paragraph
#: separators, the bidirectional controls (they reorder what the terminal shows) and lone
#: surrogates (a file name that is not UTF-8). Ids, uris and labels may hold any of them.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f"
                          r"\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(text: str) -> str:
    """``text`` for a terminal: each character of :data:`_UNPRINTABLE` escaped as Python
    writes it (``\\n``, ``\\x1b``, ``\\u202e``). --json output stays exact instead."""
    return _UNPRINTABLE.sub(lambda found: repr(found.group())[1:-1], text)


def _output_format(path: str) -> int:
    try:
        return client.format_for_path(path)
    except ValueError as error:
        raise UsageError(str(error)) from error


def _add_target(parser: argparse.ArgumentParser, service: str) -> None:
    from services.common.config import SERVICE_PORTS

    parser.add_argument("--target", default=None,
                        help=f"host:port of the {service} service (default: $PERCEPT_TARGET, "
                             f"else localhost:{SERVICE_PORTS['all']} (percept serve all) or "
                             f"localhost:{SERVICE_PORTS[service]} (the local cluster), "
                             "whichever answers)")
    parser.set_defaults(service_for_target=service)
    _add_tls(parser)


#: The client's TLS flags: (flag, ClientTls field, help); each field's environment
#: variable is services.common.tls.CLIENT_ENV's.
_TLS_FLAGS = (
    ("--tls-ca", "ca", "PEM CA certificates that verify the server's TLS certificate (turns "
     "TLS on)"),
    ("--tls-client-cert", "cert", "PEM client certificate, for a server that requires one "
     "(mutual TLS: its --tls-client-ca); with --tls-client-key"),
    ("--tls-client-key", "key", "PEM private key of --tls-client-cert"),
    ("--tls-server-name", "server_name", "the name to expect in the server's certificate, "
     "where the target's host is not one it lists (an IP address)"),
)


def _add_tls(parser: argparse.ArgumentParser) -> None:
    """The TLS flags of a command that calls a server (plaintext without any)."""
    from services.common.tls import CLIENT_ENV

    parser.add_argument("--tls", action="store_true", default=None,
                        help="TLS, verifying the server with gRPC's bundled public CA roots "
                             "($GRPC_DEFAULT_SSL_ROOTS_FILE_PATH replaces them; env "
                             "PERCEPT_TLS=1); "
                             "any --tls-* flag below turns TLS on too")
    for flag, field, text in _TLS_FLAGS:
        parser.add_argument(flag, default=None, help=f"{text} (env {CLIENT_ENV[field]})",
                            metavar="NAME" if flag == "--tls-server-name" else "FILE")


def _client_tls(args: argparse.Namespace) -> None:
    """Makes the command's TLS flags, each over its environment variable, how it reaches
    servers; UsageError for a client certificate without its key or the other way round."""
    if not hasattr(args, "tls_ca"):
        return
    from services.common.tls import ClientTls, TlsError

    try:
        client.use_tls(ClientTls.from_environment(tls=bool(args.tls), **{
            field: getattr(args, flag[2:].replace("-", "_")) for flag, field, _ in _TLS_FLAGS}))
    except TlsError as error:
        raise UsageError(f"{error} (--tls-client-cert, --tls-client-key)") from error


#: The commands that run models or read training data: they run from percept's source tree
#: (a checkout after `make setup`, or the container image), whose models/, data/ and
#: assets/ they use, not from a pip-installed percept (the client: pyproject.toml).
SOURCE_TREE_COMMANDS = ("serve", "run", "data", "train", "eval")
#: The commands whose dependencies are an extra of the package: command -> extra.
EXTRA_COMMANDS = {"cluster": "cluster"}


def source_tree_refusal(command: str) -> str | None:
    """Why ``command`` cannot run here: a source-tree command in a pip-installed percept;
    None where it can."""
    from training.assets import REPO_ROOT, runs_from_source

    if command not in SOURCE_TREE_COMMANDS or runs_from_source():
        return None
    return (f"percept {command} runs from percept's source tree: a checkout of the "
            "repository (make setup installs what it needs) or the container image "
            f"(deploy/README.md). This percept is installed in {REPO_ROOT}, with the client "
            "commands only")


def missing_dependency_text(command: str, error: ModuleNotFoundError) -> str | None:
    """What to install for ``command``, which stopped on ``error``; None where the command
    is a client command (whose dependencies the package declares: a bug, not a setting)
    or the missing module is percept's own."""
    module = error.name or "?"
    if module.split(".")[0] in ("services", "training", "percept", "deploy"):
        return None  # percept's own code: a broken install or a bug, shown whole
    if command in EXTRA_COMMANDS:
        extra = EXTRA_COMMANDS[command]
        return (f"percept {command} needs the Python module '{module}', which is not "
                f"installed here: install percept with its '{extra}' extra (pip install "
                f"'path/to/percept[{extra}]'; a checkout's make setup installs it too)")
    if command in SOURCE_TREE_COMMANDS:
        return (f"percept {command} needs the Python module '{module}', which is not "
                "installed in this environment: make setup installs what the checkout's "
                "commands need (requirements.txt)")
    return None


class _Unreachable(grpc.RpcError):
    """UNAVAILABLE before the first request: reported as a failed call (exit 1)."""

    def __init__(self, target: str, details: str = "") -> None:
        super().__init__(target)
        self.target = target
        self._details = details or f"cannot connect to {target}"

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details


def _channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to the command's service: --target, else $PERCEPT_TARGET, else the first
    server on this machine that answers (serve all's port, then the local cluster's port
    for the service); UNAVAILABLE naming the addresses tried when none does. Sets
    ``args.address`` to where it leads."""
    explicit = args.target or os.environ.get("PERCEPT_TARGET")
    if explicit:
        args.address = explicit
        return client.connect(explicit)
    service = args.service_for_target
    found = client.find_local_server(service)
    if found is None:
        tried = " or ".join(f"{target} ({what})"
                            for target, what in client.local_targets(service).items())
        raise _Unreachable(tried, f"nothing answers at {tried}: start a server with "
                           "`make run` (the local cluster) or `percept serve all`, or give "
                           "--target HOST:PORT (or $PERCEPT_TARGET)")
    args.address, channel = found
    return channel


# -- serving -----------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from services.common.allocator import retain_freed_memory
    from services.common.config import ConfigError, config_from_args

    try:
        config = config_from_args(args.name, args)
    except ConfigError as error:
        raise UsageError(str(error)) from error
    if config.retain_memory:  # before the server's threads first allocate
        retain_freed_memory()
    from services.common.server import run_server

    return run_server(config)


def cmd_run(args: argparse.Namespace) -> int:
    from services.local_cluster import run_local_cluster

    return run_local_cluster(out_dir=Path(args.out), demo=not args.no_demo,
                             keep_serving=not args.once)


def _nothing_at(target: str, timeout: float) -> bool:
    """Whether no server answers at ``target`` (a health check is UNAVAILABLE)."""
    try:
        client.health_status(client.connect(target), "", timeout)
    except grpc.RpcError as error:
        return client.absent(error)
    return False


def _local_cluster(service: str = "") -> dict[str, str]:
    """The local cluster's processes (`make run`: one port per service), by service."""
    from services.common.config import SERVICE_FULL_NAMES, SERVICE_PORTS

    if service and service not in SERVICE_FULL_NAMES:
        raise UsageError(f"nothing answers at localhost:{SERVICE_PORTS['all']}, and "
                         f"{service!r} is not a service of the local cluster: "
                         f"{', '.join(SERVICE_FULL_NAMES)}")
    return {name: f"localhost:{SERVICE_PORTS[SERVICE_FULL_NAMES[name]]}"
            for name in ([service] if service else SERVICE_FULL_NAMES)}


def _default_targets(args: argparse.Namespace, timeout: float, service: str = ""
                     ) -> dict[str, str] | None:
    """With no --target or $PERCEPT_TARGET and nothing at `percept serve all`'s port, the
    local cluster's processes; None when one target answers for everything."""
    from services.common.config import SERVICE_PORTS

    if args.target or os.environ.get("PERCEPT_TARGET"):
        return None
    if not _nothing_at(f"localhost:{SERVICE_PORTS['all']}", timeout):
        return None
    return _local_cluster(service)


def _single_target(args: argparse.Namespace) -> str:
    from services.common.config import SERVICE_PORTS

    return args.target or os.environ.get("PERCEPT_TARGET") or \
        f"localhost:{SERVICE_PORTS['all']}"


def cmd_health(args: argparse.Namespace) -> int:
    """One server's health; with no target, `percept serve all`'s port, and where nothing
    listens there, each process of the local cluster (`make run`: one port per service)."""
    timeout = _positive_timeout(args.timeout)
    cluster = _default_targets(args, timeout, args.service)
    if cluster is None:
        return _health_of(_single_target(args), args.service, timeout)
    worst = 0
    for service, local in cluster.items():
        try:
            status = client.health_status(client.connect(local), service, timeout)
        except grpc.RpcError as error:
            status = client.failure_text(error)
        print(printable(f"{service} at {local}: {status}"))
        worst = max(worst, 0 if status == "SERVING" else 1)
    return worst


def cmd_info(args: argparse.Namespace) -> int:
    """percept.v1.ServerInfo of a server (with no target: as `percept health` finds them)."""
    from services.proto_json import message_to_json_dict

    timeout = _positive_timeout(args.timeout)
    cluster = _default_targets(args, timeout)
    targets = [_single_target(args)] if cluster is None else list(cluster.values())
    answers, failed = [], 0
    for target in targets:
        try:
            answers.append((target, client.server_info(client.connect(target), timeout)))
        except grpc.RpcError as error:
            print(printable(f"{target}: {client.failure_text(error)}"), file=sys.stderr)
            failed = 1
    if args.json:
        print(json.dumps({"servers": [
            {"target": target, **message_to_json_dict(info)}
            for target, info in answers]}, indent=2))
        return failed
    for target, info in answers:
        print(_describe_server(target, info))
    return failed


def _describe_server(target: str, info: server_pb2.GetServerInfoResponse) -> str:
    limits = info.limits
    lines = [f"{target}: percept {info.version}, "
             f"{'ready' if info.ready else 'loading its models'}",
             f"  services: {', '.join(info.services)}"]
    for model in info.models:
        default = " (default)" if model.is_default else ""
        lines.append(f"  {model.service.removeprefix('percept.v1.')}: {model.name} = "
                     f"{model.artifact}{default}")
    gatys = (f", Gatys {limits.max_iterations} iterations x {limits.max_optimisations}"
             if "percept.v1.StyleTransfer" in info.services else "")
    # (a server older than the field leaves it 0: not printed)
    calls = (f", {limits.max_concurrent_rpcs} calls at once"
             + (" (shared fairly by clients)" if limits.fair_share else "")
             if limits.max_concurrent_rpcs else "")
    pings = (f", keepalive pings {limits.min_client_ping_ms / 1000:g} s apart or more"
             if limits.min_client_ping_ms else "")
    lines.append(f"  limits: {limits.max_message_bytes / 2**20:g} MiB messages, "
                 f"{limits.max_pixels:,} pixels an image, "
                 f"{limits.max_inflight_pixels / 1e6:g} MP in flight, "
                 f"queue {limits.max_queue}, batch {limits.max_batch}{gatys}{calls}{pings}")
    return "\n".join(printable(line) for line in lines)


def _health_of(target: str, service: str, timeout: float) -> int:
    try:
        status = client.health_status(client.connect(target), service, timeout=timeout)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND and not error.details():
            print(f"NOT_FOUND: the server at {target} does not serve {service!r} (a "
                  "fully-qualified name such as percept.v1.Embedding, or '' for the whole "
                  "server)", file=sys.stderr)
            return 1
        raise
    print(status)
    return 0 if status == "SERVING" else 1


# -- client commands -----------------------------------------------------------------------
#: The longest --timeout: gRPC turns larger deadlines (1e10 s, inf) into an immediate
#: DEADLINE_EXCEEDED.
MAX_TIMEOUT_SECONDS = 1_000_000.0
#: Ids per GetImages call of ``percept images ID...`` (the server takes up to 10,000).
GET_IMAGES_CHUNK = 10_000
#: How long ``percept label`` and ``search`` retry while the server answers busy (seconds).
QUERY_BUSY_PATIENCE_SECONDS = 60.0
#: How long ``percept index`` keeps resending what was not acknowledged while the server
#: answers busy (seconds).
INDEX_BUSY_PATIENCE_SECONDS = 300.0


def _whole_number(low: int, high: int, beyond: str = "") -> Callable[[str], int]:
    """A whole-number option type taking ``low..high`` (the proto's "0 means the default"
    is never sent for a value given: a value outside the range the server documents is
    refused here, exit 2); ``beyond`` explains the upper bound."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(
                f"must be {low}..{high}, got {text}" if beyond == "" else
                f"must be at least {low}, got {text}")
        if value > high:
            raise argparse.ArgumentTypeError(
                f"must be {low}..{high}, got {text}" if beyond == "" else
                f"{text} is too large ({beyond})")
        return value
    return parse


def _weight(text: str) -> float:
    """A loss weight: a finite number >= 0 (the server refuses the rest)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


#: --top of `label` and `search`: from 1 (0 would mean the server's default) up to what the
#: server documents (LabelImageRequest.k, SearchByTextRequest.k).
MAX_LABELS, MAX_HITS = 100, 1000
_label_count = _whole_number(1, MAX_LABELS, f"the server returns at most {MAX_LABELS} labels")
_hit_count = _whole_number(1, MAX_HITS, f"the server returns at most {MAX_HITS} hits")
#: --iterations: from 1 (0 would mean the server's default, 300); the most is the server's
#: --max-iterations, which `percept info` shows.
_iterations = _whole_number(1, 2**31 - 1, "the server takes at most its --max-iterations, "
                                          "2000 unless set; `percept info` shows it")
#: --max-size: the working resolution StylizeWithImage takes (0 would mean 256).
MIN_WORKING_SIZE, MAX_WORKING_SIZE = 32, 1024
_max_size = _whole_number(MIN_WORKING_SIZE, MAX_WORKING_SIZE)
#: --seed: the noise start's seed, any int64 (StylizeWithImageRequest.seed).
_seed = _whole_number(-2**63, 2**63 - 1, "the seed is a 64-bit integer")


def _positive_timeout(seconds: float) -> float:
    if not 0 < seconds <= MAX_TIMEOUT_SECONDS:
        raise UsageError(f"--timeout must be a positive number of seconds up to "
                         f"{MAX_TIMEOUT_SECONDS:g}, got {seconds:g}")
    return seconds


#: Options of folder runs only (a file IN refuses them); each is None unless given.
FOLDER_ONLY = ("format", "recursive", "skip_existing", "jobs")
FOLDER_JOBS = 4
FOLDER_FORMAT = "png"


def _folder_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("folder input (IN and OUT are folders)")
    group.add_argument("--format", choices=list(folder_runs.OUTPUT_SUFFIXES), default=None,
                       help=f"the outputs' format (default {FOLDER_FORMAT})")
    group.add_argument("--recursive", action="store_true", default=None,
                       help="descend into subfolders (OUT mirrors them)")
    group.add_argument("--skip-existing", action="store_true", default=None,
                       help="leave outputs that are already there (resumes a stopped run)")
    group.add_argument("--jobs", type=int, default=None,
                       help=f"requests in flight, batched by the server (default "
                       f"{FOLDER_JOBS}, at most {folder_runs.MAX_JOBS})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _check_reachable(path: str) -> None:
    """UsageError when a folder on the way to ``path`` cannot be entered (a missing path is
    left to the caller: for an output it is no error)."""
    try:
        os.stat(path)
    except PermissionError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from error
    except OSError:
        pass


def _is_folder_run(args: argparse.Namespace) -> bool:
    """True when IN is a folder (the folder options then get their defaults); a file input
    refuses the folder-only options."""
    _check_reachable(args.input)
    if os.path.isdir(args.input):
        args.format = args.format or FOLDER_FORMAT
        args.jobs = FOLDER_JOBS if args.jobs is None else args.jobs
        if not 1 <= args.jobs <= folder_runs.MAX_JOBS:
            raise UsageError(f"--jobs must be from 1 to {folder_runs.MAX_JOBS}, got {args.jobs}")
        return True
    given = [f"--{name.replace('_', '-')}" for name in FOLDER_ONLY
             if getattr(args, name) is not None]
    if given and not os.path.lexists(args.input):
        raise UsageError(f"cannot read input {args.input}: no such file or folder")
    if given:
        raise UsageError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} "
                         "only when IN is a folder (for one file, the output's extension "
                         "picks the format)")
    return False


#: How long a folder run waits for its first connection (seconds).
CONNECT_TIMEOUT_SECONDS = 20.0


def _run_folder(args: argparse.Namespace, verb: str, timeout: float,
                start_for: Callable[[grpc.Channel, int], folder_runs.Start]) -> int:
    """The folder run of ``args``; ``start_for(channel, output_format)`` gives the function
    that starts one file's call."""
    source, target = Path(args.input), Path(args.output)
    plan = folder_runs.plan_folder(source, target, args.format, bool(args.recursive))
    for problem in plan.problems:
        print(f"warning: {problem}", file=sys.stderr)
    report = folder_runs.FolderReport(unread_folders=len(plan.problems))
    channel = _channel(args)
    try:
        if not client.answers(channel, CONNECT_TIMEOUT_SECONDS):
            raise _Unreachable(args.address)  # at once, rather than as the first file's failure

        start = start_for(channel, client.format_for_path(f"x.{args.format}"))
        try:
            folder_runs.run_folder(plan.jobs, start, report, workers=args.jobs,
                                   patience=timeout, skip_existing=bool(args.skip_existing),
                                   quiet=args.quiet, desc=args.command,
                                   check_health=lambda: client.health_future(
                                       channel, folder_runs.HEALTH_TIMEOUT_SECONDS))
        except UsageError:
            raise  # nothing was sent
        except grpc.RpcError:
            if report.written or report.failures or report.skipped:
                print(folder_runs.summary(report, len(plan.jobs), target, verb), flush=True)
            raise  # the status says the rest
        except BaseException:  # Ctrl-C, SIGTERM, a streak: how far the run got
            print(folder_runs.summary(report, len(plan.jobs), target, verb), flush=True)
            raise
    finally:
        with local_files.signals_deferred() as noted:  # grpc hangs on an interrupted close
            channel.close()
    print(folder_runs.summary(report, len(plan.jobs), target, verb))
    if noted:  # a signal during the close of a finished run
        raise KeyboardInterrupt if noted[0] == signal.SIGINT else Terminated
    return 1 if report.failures or plan.problems else 0


def _read_image(path: str, what: str = "input") -> bytes:
    """An image file to send (exit 2 when unreadable, empty or over the message limit)."""
    return read_image(path, what, limit=client.MAX_IMAGE_BYTES)


def _fits_one_message(parts: dict[str, tuple[str | None, bytes]]) -> None:
    """UsageError when the files one request carries (``{what: (path, data)}``) are over
    the message limit together (each alone is checked as it is read)."""
    sent = {what: (path, data) for what, (path, data) in parts.items() if data}
    total = sum(len(data) for _, data in sent.values())
    if len(sent) > 1 and total > client.MAX_IMAGE_BYTES:
        files = ", ".join(f"{what} {path} ({size_text(len(data))})"
                          for what, (path, data) in sent.items())
        raise UsageError(f"{files} take {size_text(total)} together, over the "
                         f"{client.MAX_IMAGE_BYTES / 2**20:.0f} MiB a message may carry")


def cmd_upscale(args: argparse.Namespace) -> int:
    timeout = _positive_timeout(args.timeout)
    if _is_folder_run(args):
        return _run_folder(args, "upscaled", timeout, lambda channel, fmt: (
            lambda image: client.upscale_future(channel, image, model=args.model,
                                                output_format=fmt, timeout=timeout)))
    fmt, image = _output_format(args.output), _read_image(args.input)
    with atomic_output(args.output) as write:
        channel = _channel(args)
        response = retrying(lambda: client.upscale(
            channel, image, model=args.model, output_format=fmt, timeout=timeout),
            patience=timeout)
        write(response.image)
    print(printable(f"{args.output}: {response.width}x{response.height} ({response.model})"))
    return 0


def _version_number(version: str) -> int | str:
    """StyleInfo.version (an integer, as text) as a number, as `percept info --json` gives
    model versions; text that is no integer stays text."""
    try:
        return int(version)
    except ValueError:
        return version


def cmd_styles(args: argparse.Namespace) -> int:
    channel = _channel(args)
    styles = _when_ready(lambda: client.list_styles(channel))
    if args.json:
        print(json.dumps({"styles": [{"name": s.name, "title": s.title,
                                      "version": _version_number(s.version)}
                                     for s in styles]}))
    elif not styles:
        print("no fixed styles installed (StylizeWithImage works with any --style-image)")
    for style in styles if not args.json else []:
        print(printable(f"{style.name:20s} {style.title} (v{style.version})"))
    return 0


#: The server's style layers where a request names none (StylizeWithImageRequest).
DEFAULT_STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


def _layer_weights(pairs: Sequence[str]) -> dict[str, float]:
    """--layer-weight LAYER=W pairs over the default layers (each weighted 1): a request
    that names layers has only those, so the defaults are sent along with the ones given,
    and a weight of 0 drops a layer. None given: empty (the server's defaults)."""
    weights = {name: 1.0 for name in DEFAULT_STYLE_LAYERS} if pairs else {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            if not sep:
                raise ValueError
            weights[name.strip()] = _weight(value)
        except ValueError as error:
            raise UsageError(f"--layer-weight wants LAYER=WEIGHT, got {pair!r}") from error
        except argparse.ArgumentTypeError as error:
            verb = "" if str(error).startswith("must") else "is "  # "not a number: ..."
            raise UsageError(f"--layer-weight {pair}: the weight {verb}{error}") from error
    return weights


# Options of one kind of stylisation only; the other kind refuses them rather than
# ignoring them. Each is None unless given (the defaults are applied in cmd_stylize).
STYLE_IMAGE_ONLY = ("iterations", "init", "optimizer", "max_size", "layer_weight",
                    "content_weight", "style_weight", "tv_weight", "seed")
FIXED_STYLE_ONLY = ("strength",)
STYLE_IMAGE_DEFAULTS = {"iterations": 300, "init": "content", "optimizer": "lbfgs",
                        "max_size": 256, "layer_weight": [], "seed": 0}
STYLIZE_TIMEOUTS = {"style": 300.0, "style_image": 3600.0}


def _refuse_options_of_the_other_kind(args: argparse.Namespace) -> None:
    mode, other = ("--style", STYLE_IMAGE_ONLY) if args.style else ("--style-image",
                                                                      FIXED_STYLE_ONLY)
    given = [f"--{name.replace('_', '-')}" for name in other if getattr(args, name) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply "
                         f"to {mode}")


def _check_shared_options(args: argparse.Namespace, mask: bytes) -> None:
    """--strength and --mask, checked before anything is sent (in a folder run they are
    shared by every file: a bad one is one error, not the same failure for every file)."""
    from services.common.errors import InvalidArgument
    from services.common.images import decode_image

    if args.strength is not None and not (math.isfinite(args.strength)
                                          and 0 <= args.strength <= 1):
        raise UsageError(f"--strength must be 0..1, got {args.strength!r}")
    if mask:
        try:  # as the server decodes it; the server's pixel cap is its own to check
            decode_image(mask, max_pixels=sys.maxsize, what=f"mask {args.mask}")
        except InvalidArgument as error:
            raise UsageError(str(error)) from error


def cmd_stylize(args: argparse.Namespace) -> int:
    from percept.v1 import style_pb2

    if bool(args.style) == bool(args.style_image):
        raise UsageError("give exactly one of --style NAME or --style-image PATH")
    _refuse_options_of_the_other_kind(args)
    for name, default in STYLE_IMAGE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    timeout = _positive_timeout(args.timeout if args.timeout is not None
                                else STYLIZE_TIMEOUTS["style" if args.style else "style_image"])
    folder_run = _is_folder_run(args)
    if folder_run and not args.style:
        raise UsageError("a folder input needs --style NAME: --style-image runs a long "
                         "optimisation per image (loop over the files to do that)")
    # an empty mask field means "no mask" on the wire: an empty file is refused
    mask = b"" if args.mask is None else _read_image(args.mask, "mask")
    _check_shared_options(args, mask)
    if folder_run:

        def start_for(channel: grpc.Channel, fmt: int) -> folder_runs.Start:
            def start(image: bytes) -> grpc.Future:
                request = style_pb2.StylizeRequest(
                    image=image, style=args.style, preserve_color=args.preserve_color,
                    mask=mask, output_format=fmt)
                if args.strength is not None:
                    request.strength = args.strength
                return client.stylize_future(channel, request, timeout=timeout)
            return start

        return _run_folder(args, "stylised", timeout, start_for)
    fmt = _output_format(args.output)
    image = _read_image(args.input, "content image" if args.style_image else "input")
    style_image = b"" if args.style else _read_image(args.style_image, "style image")
    _fits_one_message({"content image": (args.input, image),
                       "style image": (args.style_image, style_image),
                       "mask": (args.mask, mask)})
    if args.style:
        request = style_pb2.StylizeRequest(image=image, style=args.style,
                                           preserve_color=args.preserve_color, mask=mask,
                                           output_format=fmt)
        if args.strength is not None:
            request.strength = args.strength
        with atomic_output(args.output) as write:
            channel = _channel(args)
            result = retrying(lambda: client.stylize(channel, request, timeout=timeout),
                              patience=timeout)
            write(result.image)
    else:
        from tqdm import tqdm

        optimisation = style_pb2.StylizeWithImageRequest(
            content_image=image, style_image=style_image,
            iterations=args.iterations, preserve_color=args.preserve_color, mask=mask,
            max_size=args.max_size, seed=args.seed, output_format=fmt,
            init={"content": style_pb2.STYLE_INIT_CONTENT,
                  "noise": style_pb2.STYLE_INIT_BLURRED_NOISE}[args.init],
            optimizer={"lbfgs": style_pb2.STYLE_OPTIMIZER_LBFGS,
                       "adam": style_pb2.STYLE_OPTIMIZER_ADAM}[args.optimizer],
            style_layer_weights=_layer_weights(args.layer_weight))
        for name in ("content_weight", "style_weight", "tv_weight"):
            if getattr(args, name) is not None:
                setattr(optimisation, name, getattr(args, name))
        with atomic_output(args.output) as write, contextlib.ExitStack() as bars:
            bar: tqdm | None = None  # opened by the first progress: a refusal shows none

            def on_progress(p: style_pb2.StylizeProgress) -> None:
                nonlocal bar
                if bar is None:
                    bar = bars.enter_context(tqdm(total=p.iterations, desc="stylize",
                                                  unit="it", disable=args.quiet))
                bar.total = p.iterations
                bar.update(p.iteration - bar.n)
                bar.set_postfix(loss=f"{p.total_loss:.3g}")

            channel = _channel(args)
            result = retrying(lambda: client.stylize_with_image(
                channel, optimisation, on_progress, timeout=timeout),
                patience=timeout)
            write(result.image)
    print(printable(f"{args.output}: {result.width}x{result.height} ({result.model})"))
    return 0


def _labels_json(response: object) -> dict[str, object]:
    return {"labels": [{"wnid": label.wnid, "lemmas": list(label.lemmas), "gloss": label.gloss,
                        "score": round(float(label.score), 4)}
                       for label in response.labels]}  # type: ignore[attr-defined]


def cmd_label(args: argparse.Namespace) -> int:
    from percept.v1 import embed_pb2

    method = {"default": embed_pb2.EMBEDDING_METHOD_UNSPECIFIED,
              "devise": embed_pb2.EMBEDDING_METHOD_DEVISE,
              "conse": embed_pb2.EMBEDDING_METHOD_CONSE}[args.method]
    image = _read_image(args.input)
    channel = _channel(args)
    response = retrying(lambda: client.label_image(
        channel, image, k=args.top, method=method, under_wnid=args.under or "",
        zero_shot=args.zero_shot, one_per_word=not args.every_sense),
        patience=QUERY_BUSY_PATIENCE_SECONDS)
    if args.json:
        print(json.dumps(_labels_json(response)))
    else:
        for label in response.labels:
            print(printable(f"{label.score:6.3f}  {label.wnid}  "
                            f"{', '.join(label.lemmas[:3])}  — {label.gloss[:70]}"))
    if not response.labels:  # stdout (and its JSON) stays as it is
        why = ([f"under {args.under}"] if args.under else []) + (
            ["once the ImageNet classes are left out (--zero-shot)"] if args.zero_shot else [])
        print(" ".join(["no labels", *why]), file=sys.stderr)
    return 0


def _image_files(paths: Sequence[str], recursive: bool) -> tuple[list[Path], int]:
    """The files named, and the images of the folders named (as folder runs read them);
    with the number of subfolders that could not be read (each reported)."""
    files: list[Path] = []
    unread_folders = 0
    for raw in paths:
        path = Path(raw)
        _check_reachable(raw)
        if os.path.isdir(path):
            found, problems = folder_runs.image_files(path, recursive)
            files.extend(found)
            unread_folders += len(problems)
            for problem in problems:
                print(printable(f"warning: {problem}"), file=sys.stderr)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise UsageError(f"no such file or folder: {raw}")
    return files, unread_folders


#: The largest image file ``percept index`` sends: one AddImageRequest must fit the
#: client's message limit, with room for its id and framing.
MAX_INDEX_IMAGE_BYTES = client.MAX_IMAGE_BYTES


def cmd_index(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    found, unread_folders = _image_files(args.paths, args.recursive)
    if not found and not unread_folders:  # as a folder run: nothing to send is a mistake
        raise UsageError(f"no images in {', '.join(args.paths)} "
                         f"({', '.join(folder_runs.IMAGE_SUFFIXES)}"
                         f"{'' if args.recursive else '; --recursive descends into subfolders'})")
    # one image per file, however often it was named (its id is its absolute path)
    files = {str(path.resolve()): path for path in found}  # id -> the path as named
    unreadable: list[str] = []
    answered: set[str] = set()  # ids acknowledged (added or rejected), or not read

    def items() -> object:
        for image_id, path in files.items():
            if image_id in answered:
                continue
            try:
                size = path.stat().st_size
                if size > MAX_INDEX_IMAGE_BYTES:  # gRPC would refuse the whole stream
                    unreadable.append(f"{path}: {size / 2**20:.1f} MiB, over the "
                                      f"{MAX_INDEX_IMAGE_BYTES / 2**20:.0f} MiB a message "
                                      "may carry")
                    answered.add(image_id)
                    continue
                data = path.read_bytes()
                if not data:
                    unreadable.append(f"{path}: an empty file")
                    answered.add(image_id)
                    continue
            except OSError as error:
                unreadable.append(f"unreadable {path}: {error.strerror}")
                answered.add(image_id)
                continue
            # the uri is the absolute path too: it must lead to the file from anywhere
            yield search_pb2.AddImageRequest(id=image_id, uri=image_id, image=data)

    added, rejected = 0, []
    channel = _channel(args)

    def send_the_rest() -> None:
        nonlocal added
        for ack in client.add_images(channel, items()):  # type: ignore[arg-type]
            added += len(ack.added)
            rejected.extend(ack.rejected)
            answered.update(ack.added)
            answered.update(r.id for r in ack.rejected)
            bar.update(len(ack.added) + len(ack.rejected))

    finished = False
    try:
        with tqdm(total=len(files), desc="index", unit="img", disable=args.quiet) as bar:
            # busy (the server's pixel budget or queue): what was acknowledged is in, and a
            # new stream sends the rest after the server's pushback; the patience starts
            # again whenever a stream got further
            retrying(send_the_rest, patience=INDEX_BUSY_PATIENCE_SECONDS,
                     progress=lambda: len(answered))
        finished = True
    finally:  # what was done is said even when the run fails part way
        for rejection in rejected:
            print(printable(f"warning: skipped {rejection.id}: {rejection.code}: "
                            f"{rejection.reason}"), file=sys.stderr)
        for line in unreadable:
            print(printable(f"warning: skipped {line}"), file=sys.stderr)
        skipped = len(rejected) + len(unreadable)
        folders = (f"; {unread_folders} folder{'s' * (unread_folders > 1)} not read"
                   if unread_folders else "")
        print(f"indexed {added} of {len(files)} images; skipped {skipped}{folders}"
              f"{'' if finished else '; the run failed'}", flush=True)
    return 1 if skipped or unread_folders else 0  # as folder runs: something was left out


def cmd_search(args: argparse.Namespace) -> int:
    if args.text and args.image:
        raise UsageError("give a TEXT query or --image PATH, not both")
    if not args.text and not args.image:
        raise UsageError("give a TEXT query or --image PATH")
    image = _read_image(args.image) if args.image else b""
    sheet_format = _sheet_format(args.sheet) if args.sheet else None
    # an unwritable --sheet fails before the search, not after it
    with atomic_output(args.sheet) if args.sheet else contextlib.nullcontext() as write_sheet:
        return _search(args, image, sheet_format, write_sheet)


def _search(args: argparse.Namespace, image: bytes, sheet_format: str | None,
            write_sheet: Callable[[bytes], None] | None) -> int:
    channel = _channel(args)
    if args.image:
        response = retrying(lambda: client.search_by_image(channel, image, k=args.top,
                                                           min_score=args.min_score),
                            patience=QUERY_BUSY_PATIENCE_SECONDS)
    else:
        response = retrying(lambda: client.search_by_text(channel, args.text, k=args.top,
                                                          min_score=args.min_score),
                            patience=QUERY_BUSY_PATIENCE_SECONDS)
    if args.json:
        print(json.dumps({"hits": [{"id": h.id, "uri": h.uri, "score": round(float(h.score), 4)}
                                   for h in response.hits]}))
    else:
        for hit in response.hits:
            print(f"{hit.score:6.3f}  {printable(hit.uri or hit.id)}")
    if not response.hits:  # stdout (and its JSON) stays as it is
        print(_no_hits(channel, args.min_score), file=sys.stderr)
    if sheet_format is not None and write_sheet is not None:
        _write_sheet(args.sheet, sheet_format, response.hits, write_sheet)
    return 0


#: The most hits --sheet pictures (12 rows of 4)
MAX_SHEET_HITS = 48
#: --sheet's formats, by the output's extension (Pillow's names)
_SHEET_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def _sheet_format(path: str) -> str:
    fmt = _SHEET_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise UsageError(f"cannot tell the --sheet format from {path!r}: end it in "
                         f"{', '.join(_SHEET_FORMATS)}")
    return fmt


def _hit_file(uri: str) -> Path | None:
    """The local file a hit's uri names (a path, or a file:// uri), if it is there."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(uri)
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
    elif not parsed.scheme and uri:
        path = Path(uri)
    else:
        return None
    return path if path.is_file() else None


def _write_sheet(output: str, fmt: str, hits: Sequence[search_pb2.Hit],
                 write: Callable[[bytes], None]) -> None:
    """The hits as one picture: a captioned thumbnail of each (rank, score, file name)
    whose uri is a file here; the others are named on stderr."""
    from services.contact_sheet import encoded_sheet

    pictures, elsewhere = [], []
    if len(hits) > MAX_SHEET_HITS:
        print(f"--sheet shows the first {MAX_SHEET_HITS} of the {len(hits)} hits",
              file=sys.stderr)
    for rank, hit in enumerate(hits[:MAX_SHEET_HITS], 1):
        path = _hit_file(hit.uri or hit.id)
        if path is None:
            elsewhere.append(hit.uri or hit.id)
            continue
        pictures.append((f"#{rank}  {hit.score:.2f}  {path.name}", path))
    unreadable: list[Path] = []  # a file that is no image any more is left out
    data = encoded_sheet(pictures, fmt, unreadable=unreadable)
    if data is None:
        print(printable(f"--sheet {output}: no hit is an image file here; nothing written"),
              file=sys.stderr)
    else:
        write(data)
        print(printable(f"sheet: {output} ({len(pictures) - len(unreadable)} hits pictured)"),
              file=sys.stderr)
    for uri in elsewhere + [str(path) for path in unreadable]:
        print(f"not on the sheet (no image file here): {printable(uri)}", file=sys.stderr)


def _no_hits(channel: grpc.Channel, min_score: float | None) -> str:
    """Why a search found nothing: an empty index, or no image scoring --min-score."""
    try:
        empty = client.search_stats(channel).count == 0
    except grpc.RpcError:  # only a note: the search itself answered
        empty = False
    if empty:
        return "no images in the index (`percept index PATH...` adds them)"
    if min_score is not None:
        return f"no image scores {min_score:g} or more"
    return "no hits"


def _looks_like_a_path(text: str) -> bool:
    """Whether an id someone typed names a local path (that may be gone since it was
    indexed): it exists, or has a folder separator, or starts with ~ or ."""
    return bool(text) and (os.path.exists(text) or os.sep in text
                           or text.startswith(("~", ".")))


def _indexed_id(text: str) -> str:
    """The id `percept index` gave the file or folder ``text`` names (its absolute path,
    links resolved), also when it has been removed since; ``text`` itself when it is no
    path (a plain id)."""
    if not _looks_like_a_path(text):
        return text
    return str(Path(text).expanduser().resolve(strict=False))


def _indexed_prefix(text: str) -> str:
    """A --prefix as `percept index` names what the local path ``text`` leads to (a folder,
    or a path ending in /: ``<its absolute path>/``, its images and nothing beside it); any
    other text is taken as it is."""
    resolved = _indexed_id(text)
    folder = os.path.isdir(resolved) or (resolved != text and text.endswith(("/", os.sep)))
    if folder and not resolved.endswith(os.sep):
        resolved += os.sep
    return resolved


def cmd_images(args: argparse.Namespace) -> int:
    """The indexed images: the given ids (GetImages), or every one (ListImages). An id or
    --prefix that names a local file or folder is looked up as `percept index` named it
    (by its absolute path), and a relative one as given too."""

    if args.ids and args.prefix:
        raise UsageError("give ids or --prefix, not both")
    channel = _channel(args)
    missing: list[str] = []
    entries: list[search_pb2.ImageEntry]
    if args.ids:
        # each id asked for -> the ids it may be indexed under
        wanted = {given: list(dict.fromkeys([_indexed_id(given), given]))
                  for given in dict.fromkeys(args.ids)}
        ids = list(dict.fromkeys(i for candidates in wanted.values() for i in candidates))
        found: dict[str, search_pb2.ImageEntry] = {}
        for start in range(0, len(ids), GET_IMAGES_CHUNK):
            chunk = ids[start:start + GET_IMAGES_CHUNK]
            answer = _when_ready(functools.partial(client.get_images, channel, chunk))
            found.update((entry.id, entry) for entry in answer.images)
        entries = [found[i] for i in ids if i in found]
        missing = [given for given, candidates in wanted.items()
                   if not any(i in found for i in candidates)]
    else:
        prefix = _indexed_prefix(args.prefix)
        entries = _listed(channel, prefix)
        if not entries and prefix.rstrip(os.sep) != args.prefix.rstrip(os.sep):
            entries = _listed(channel, args.prefix)  # plain ids
        if not entries:  # stdout (and its JSON) stays as it is
            print(printable(f"no indexed id starts with {prefix}"
                            + (f" or {args.prefix}" if prefix != args.prefix else ""))
                  if prefix else "no images in the index", file=sys.stderr)
    if args.json:
        print(json.dumps({"images": [{"id": e.id, "uri": e.uri,
                                      "added": e.added.ToJsonString()} for e in entries],
                          "missing": missing}))
    else:
        for entry in entries:
            added = entry.added.ToDatetime().strftime("%Y-%m-%d %H:%M:%SZ")
            print(f"{added}  {printable(entry.id)}"
                  + (f"  {printable(entry.uri)}" if entry.uri != entry.id else ""))
        for image_id in missing:
            print(f"not indexed: {printable(image_id)}", file=sys.stderr)
    return 1 if missing else 0


def _when_ready(call: Callable[[], T], not_ready: Collection[str] = NOT_READY_REASONS) -> T:
    """``call()``, asked again while the server is loading or draining (or busy), for up
    to :data:`services.retries.UNAVAILABLE_PATIENCE_SECONDS`: the index commands' calls.
    ``not_ready``: the UNAVAILABLE reasons retried (services/retries.py)."""
    return retrying(call, patience=UNAVAILABLE_PATIENCE_SECONDS, not_ready=not_ready)


def _listed(channel: grpc.Channel, prefix: str, page_size: int = 1000,
            first_page_only: bool = False) -> list[search_pb2.ImageEntry]:
    """The indexed images whose ids start with ``prefix`` (the first one, at most, with
    ``first_page_only`` and a ``page_size`` of 1), listed again from the start where the
    server was not ready."""
    def listing() -> list[search_pb2.ImageEntry]:
        entries = client.list_images(channel, prefix=prefix, page_size=page_size)
        return list(itertools.islice(entries, page_size) if first_page_only else entries)

    return _when_ready(listing)


def cmd_delete(args: argparse.Namespace) -> int:
    """Takes images out of the index (DeleteImages): the given ids, each looked up as
    `percept images` looks it up (the file's absolute path, else the text as typed) and the
    one found deleted; or every id under --prefix once --yes confirms it."""
    if bool(args.ids) == bool(args.prefix):
        raise UsageError("give ids, or --prefix P (with --yes): not both, not neither")
    channel = _channel(args)
    if args.prefix:
        ids = _ids_under_prefix(channel, args.prefix)
        if not ids:
            return 1
        if not args.yes:
            shown = ", ".join(printable(i) for i in ids[:3]) + (", ..." if len(ids) > 3
                                                                   else "")
            raise UsageError(f"this would delete {len(ids):,} image"
                             f"{'s' if len(ids) != 1 else ''} ({shown}): add --yes to "
                             "delete them")
        chosen, missing = ids, []
    else:
        wanted = {given: list(dict.fromkeys([_indexed_id(given), given]))
                  for given in dict.fromkeys(args.ids)}
        candidates = list(dict.fromkeys(i for names in wanted.values() for i in names))
        found: set[str] = set()
        for start in range(0, len(candidates), GET_IMAGES_CHUNK):
            chunk = candidates[start:start + GET_IMAGES_CHUNK]
            answer = _when_ready(functools.partial(client.get_images, channel, chunk))
            found.update(entry.id for entry in answer.images)
        # one id a given text: its absolute path's where both are indexed
        chosen = list(dict.fromkeys(next(n for n in names if n in found)
                                    for names in wanted.values()
                                    if any(n in found for n in names)))
        missing = [given for given, names in wanted.items()
                   if not any(n in found for n in names)]
    deleted = 0
    for start in range(0, len(chosen), GET_IMAGES_CHUNK):
        chunk = chosen[start:start + GET_IMAGES_CHUNK]
        # not again after SERVER_DRAINING: a delete the drain cut off may have been done,
        # and a second one would count its images as not found
        deleted += _when_ready(functools.partial(client.delete_images, channel, chunk),
                               not_ready={"SERVER_LOADING"}).deleted
    print(f"deleted {deleted:,} image{'s' if deleted != 1 else ''}")
    for image_id in missing:
        print(f"not indexed: {printable(image_id)}", file=sys.stderr)
    return 1 if missing else 0


def _ids_under_prefix(channel: grpc.Channel, text: str) -> list[str]:
    """The ids `delete --prefix TEXT` takes out, saying on stderr why there are none.

    A relative path that names nothing here is first the ids' own prefix
    (``s3://bucket/2026-01``, ``photo/che``: ids a client gave, not paths). Where no id
    starts with it but ids of the absolute path it would name do, it is a folder deleted
    since it was indexed, and must end with / to be taken as one: ``~/Pictures/old``
    alone would also take ``~/Pictures/old-backup/``."""
    prefix = _indexed_prefix(text)
    if prefix != text and not prefix.endswith(os.sep) and not os.path.exists(prefix):
        ids = [entry.id for entry in _listed(channel, text)]
        if ids:
            return ids
        if _listed(channel, prefix, page_size=1, first_page_only=True):
            raise UsageError(printable(
                f"--prefix {text} names no file or folder here: end it with / "
                f"({text.rstrip(os.sep)}/) for the images indexed from a folder that is "
                "gone, or give the ids' own prefix"))
        print(printable(f"no indexed id starts with {text} or {prefix}"), file=sys.stderr)
        return []
    ids = [entry.id for entry in _listed(channel, prefix)]
    if not ids and prefix != text:  # plain ids that look like a path
        ids = [entry.id for entry in _listed(channel, text)]
    if not ids:
        print(printable(f"no indexed id starts with {prefix}"
                        + (f" or {text}" if prefix != text else "")), file=sys.stderr)
    return ids


def _cosine(text: str) -> float:
    """A --min-score: a cosine, -1..1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a cosine, -1..1, got {text}")
    return value


def cmd_cluster_status(args: argparse.Namespace) -> int:
    from services.cluster_status import cluster_status

    return cluster_status(namespace=args.namespace, context=args.context)


# -- parser ------------------------------------------------------------------------------
# Trainer front ends; each module imports only the standard library until a command runs.
# Search has nothing to train: training.cli_search registers ``percept eval search`` only.
TRAINER_CLIS = ("training.cli_superres", "training.cli_style", "training.cli_devise",
                "training.cli_search")


def _register_training(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`percept data ...`, `percept train MODEL ...` and `percept eval MODEL ...`."""
    importlib.import_module("training.data.cli").register(sub)
    train = sub.add_parser("train", help="train a model and export its artifact to models/")
    train_sub = train.add_subparsers(dest="train_command", required=True, metavar="MODEL")
    evaluate = sub.add_parser("eval", help="evaluate models and write metrics and pictures")
    eval_sub = evaluate.add_subparsers(dest="eval_command", required=True, metavar="MODEL")
    for module in TRAINER_CLIS:
        cli = importlib.import_module(module)
        if hasattr(cli, "register_train"):
            cli.register_train(train_sub)
        cli.register_eval(eval_sub)


def _package_version() -> str:
    """The installed package's version, as servers report it (``percept info``)."""
    from services.common.server_info import percept_version

    return percept_version()


def _needs_a_subcommand(parser: argparse.ArgumentParser,
                        subcommands: argparse._SubParsersAction,  # type: ignore[type-arg]
                        ) -> Handler:
    """The handler of a command given without its subcommand: its usage, and the
    subcommands there are (exit 2)."""
    def handler(args: argparse.Namespace) -> int:
        names = "; ".join(f"{choice.dest} ({choice.help})"
                          for choice in subcommands._choices_actions)
        parser.error(f"give a subcommand: {names}")
    return handler


def build_parser() -> argparse.ArgumentParser:
    from services.common.config import SERVICES, add_server_arguments

    parser = argparse.ArgumentParser(prog="percept", description=(__doc__ or "").replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"percept {_package_version()}",
                        help="print percept's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run a service (or all of them) until SIGTERM")
    serve.add_argument("name", choices=[*SERVICES, "all"], help="which service; all = every "
                       "one in this process")
    add_server_arguments(serve)
    serve.set_defaults(handler=cmd_serve)

    run = sub.add_parser("run", help="the local cluster on the default models, with the demo")
    run.add_argument("--out", default="out", help="where the demo writes its pictures")
    run.add_argument("--no-demo", action="store_true", help="only serve")
    run.add_argument("--once", action="store_true", help="stop after the demo")
    run.set_defaults(handler=cmd_run)

    health = sub.add_parser("health", help="grpc.health.v1 check; exit 0 when SERVING")
    health.add_argument("--target", default=None,
                        help="host:port (default: $PERCEPT_TARGET, else localhost:50050 "
                             "(serve all), else each port of the local cluster, "
                             "50051..50054)")
    health.add_argument("--service", default="", help="fully-qualified service name; '' = all")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    _add_tls(health)
    health.set_defaults(handler=cmd_health)

    info = sub.add_parser("info", help="what a server hosts: its services, models (name, "
                                       "version, default) and limits")
    info.add_argument("--target", default=None,
                      help="host:port (default: as `percept health` finds the servers)")
    info.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    info.add_argument("--json", action="store_true", help="print JSON")
    _add_tls(info)
    info.set_defaults(handler=cmd_info)

    upscale = sub.add_parser("upscale", help="4x super-resolution of IN into OUT")
    upscale.add_argument("input", help="image file (PNG, JPEG, WebP, ...), or a folder of them")
    upscale.add_argument("output", help="where to write the result; its extension (.png, "
                         ".jpg, .webp) picks the format (a folder for a folder IN)")
    upscale.add_argument("--model", default="", help="model name (default: the server's)")
    upscale.add_argument("--timeout", type=float, default=300.0,
                         help="deadline in seconds (default 300)")
    _folder_options(upscale)
    _add_target(upscale, "superres")
    upscale.set_defaults(handler=cmd_upscale)

    styles = sub.add_parser("styles", help="list the fixed styles")
    styles.add_argument("--json", action="store_true", help="print JSON, not a table")
    _add_target(styles, "style")
    styles.set_defaults(handler=cmd_styles)

    stylize = sub.add_parser("stylize", help="style transfer: --style NAME or --style-image S")
    stylize.add_argument("input", help="content image file, or a folder of them (--style)")
    stylize.add_argument("output", help="where to write the result; its extension (.png, "
                         ".jpg, .webp) picks the format (a folder for a folder IN)")
    stylize.add_argument("--style", help="a fixed style from `percept styles`")
    stylize.add_argument("--style-image", help="any style image (optimisation-based, Gatys)")
    stylize.add_argument("--preserve-color", action="store_true",
                         help="transfer luminance only, keep the content's colours")
    stylize.add_argument("--strength", type=float, default=None,
                         help="0..1 blend from the content to the stylisation (--style; "
                         "default 1)")
    stylize.add_argument("--mask", help="grey image of the same aspect ratio: white = "
                         "stylise, black = keep")
    stylize.add_argument("--iterations", type=_iterations, default=None,
                         help="optimisation steps, from 1 (--style-image; default 300; at "
                         "most the server's --max-iterations, 2000 unless set)")
    stylize.add_argument("--init", choices=["content", "noise"], default=None,
                         help="start from the content image or blurred noise (--style-image; "
                         "default content)")
    stylize.add_argument("--optimizer", choices=["lbfgs", "adam"], default=None,
                         help="(--style-image; default lbfgs)")
    stylize.add_argument("--max-size", type=_max_size, default=None,
                         help=f"working longest side in px, {MIN_WORKING_SIZE}.."
                         f"{MAX_WORKING_SIZE} (--style-image; default 256)")
    stylize.add_argument("--layer-weight", action="append", default=None, metavar="LAYER=W",
                         help="style weight of one VGG19 layer, e.g. relu1_1=0.5; the "
                         "other default layers (relu1_1..relu5_1) keep weight 1, =0 drops "
                         "one, another layer (relu3_2=1) is added (--style-image; "
                         "repeatable)")
    stylize.add_argument("--content-weight", type=_weight, default=None,
                         help="(--style-image; the server's default: 1)")
    stylize.add_argument("--style-weight", type=_weight, default=None,
                         help="(--style-image; the server's default: 1)")
    stylize.add_argument("--tv-weight", type=_weight, default=None,
                         help="total-variation weight (--style-image; the server's default: 10)")
    stylize.add_argument("--seed", type=_seed, default=None,
                         help="seed of the noise start, any 64-bit integer (--style-image "
                         "--init noise; default 0)")
    stylize.add_argument("--timeout", type=float, default=None,
                         help="deadline in seconds (default 300 with --style, 3600 with "
                         "--style-image)")
    _folder_options(stylize)
    _add_target(stylize, "style")
    stylize.set_defaults(handler=cmd_stylize)

    label = sub.add_parser("label", help="zero-shot WordNet labels for an image")
    label.add_argument("input", help="image file")
    label.add_argument("--top", type=_label_count, default=5,
                       help="labels to return (default 5; the server takes up to 100)")
    label.add_argument("--method", choices=["default", "devise", "conse"], default="default",
                       help="DeViSE's projection or ConSE's convex combination of class vectors; "
                       "default: the served model's default_method")
    label.add_argument("--under", help="only hyponyms of this wnid, e.g. n00015388 (animal)")
    label.add_argument("--zero-shot", action="store_true", help="exclude the ImageNet classes")
    label.add_argument("--every-sense", action="store_true",
                       help="list every synset, also several senses of one word (default: "
                            "the best-scoring sense of each word)")
    label.add_argument("--json", action="store_true", help="print JSON, not a table")
    _add_target(label, "embed")
    label.set_defaults(handler=cmd_label)

    index = sub.add_parser(
        "index", help="add images (files or folders) to the search index",
        description="Add images to the search index (an image's id is its absolute path; "
                    "adding it again replaces it). Unreadable or undecodable files are "
                    "skipped with a warning and exit 1. While the server answers busy, "
                    "what it has not acknowledged is sent again (for up to "
                    f"{INDEX_BUSY_PATIENCE_SECONDS:.0f} s).")
    index.add_argument("paths", nargs="+", help="image files or folders")
    index.add_argument("--recursive", action="store_true", help="descend into subfolders")
    index.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_target(index, "search")
    index.set_defaults(handler=cmd_index)

    search = sub.add_parser("search", help="search indexed images by TEXT or --image")
    search.add_argument("text", nargs="?", default="", help="words to search for")
    search.add_argument("--image", help="an image file: find indexed images like it")
    search.add_argument("--top", type=_hit_count, default=10,
                        help="results to return (default 10; the server takes up to 1000)")
    search.add_argument("--min-score", type=_cosine, default=None,
                        help="only hits scoring at least this cosine (-1..1; default: the "
                             "--top best, however low)")
    search.add_argument("--json", action="store_true", help="print JSON, not a table")
    search.add_argument("--sheet", metavar="OUT",
                        help="also write the hits as one picture (.png, .jpg or .webp): a "
                             "captioned thumbnail of each hit whose uri is a file here")
    _add_target(search, "search")
    search.set_defaults(handler=cmd_search)

    images = sub.add_parser("images", help="list the indexed images, or look up ids")
    images.add_argument("ids", nargs="*", help="ids to look up (exit 1 if one is not "
                                               "indexed); none: list every image")
    images.add_argument("--prefix", default="", help="only ids that start with this")
    images.add_argument("--json", action="store_true", help="print JSON, not a table")
    _add_target(images, "search")
    images.set_defaults(handler=cmd_images)

    delete = sub.add_parser("delete", help="take images out of the index")
    delete.add_argument("ids", nargs="*", help="ids (or the files `percept index` added) to "
                                               "delete; exit 1 if one is not indexed")
    delete.add_argument("--prefix", default="", help="every id that starts with this (a "
                                                     "folder: the images indexed from it)")
    delete.add_argument("--yes", action="store_true", help="confirm deleting by --prefix")
    _add_target(delete, "search")
    delete.set_defaults(handler=cmd_delete)

    cluster = sub.add_parser("cluster", help="Kubernetes deployment status")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", metavar="SUBCOMMAND")
    cluster.set_defaults(handler=_needs_a_subcommand(cluster, cluster_sub))
    status = cluster_sub.add_parser("status", help="readiness and replicas of the services")
    status.add_argument("--namespace", default="percept", help="(default percept)")
    status.add_argument("--context", default=None, help="kubectl context (default: the current)")
    status.set_defaults(handler=cmd_cluster_status)

    _register_training(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(arguments)
    args.command_line = " ".join(["percept", *(shlex.quote(a) for a in arguments)])
    handler: Handler = getattr(args, "handler", None) or args.func
    writes_outputs = args.command in ("upscale", "stylize")
    refusal = source_tree_refusal(args.command)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    from services.common.tls import TlsError

    try:
        _client_tls(args)
        with sigterm_raises() if writes_outputs else contextlib.nullcontext():
            return handler(args)
    except grpc.RpcError as error:
        code = error.code() if hasattr(error, "code") else None
        details = error.details() if hasattr(error, "details") else str(error)
        name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
        if code == grpc.StatusCode.UNIMPLEMENTED and details == "Method not found!":
            # gRPC's own answer: the server there is not the service this command calls
            service = getattr(args, "service_for_target", None)
            address = getattr(args, "address", None)
            from services.common.config import SERVICE_PORTS

            where = (f"; is {address} the {service} service's address (the local "
                     f"cluster's: localhost:{SERVICE_PORTS[service]})?"
                     if service and address else "")
            details = f"{details} (the server does not serve this call{where})"
        hint = client.tls_hint(error)
        print(printable(f"{name}: {details}" + (f" ({hint})" if hint else "")),
              file=sys.stderr)
        return 1
    except TlsError as error:
        print(printable(f"error: {error}"), file=sys.stderr)
        return 2
    except RetriedTooLong as error:
        print(printable(str(error)), file=sys.stderr)
        return 1
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except folder_runs.FolderRunStopped as error:
        print(f"stopped: {error}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as error:
        text = missing_dependency_text(args.command, error)
        if text is None:
            raise
        print(f"error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Terminated:
        return 143
    except BrokenPipeError:  # the reader went away (`percept styles | head -1`)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing more to flush at exit
        return 141  # 128 + SIGPIPE, as if the signal had ended the process


if __name__ == "__main__":
    sys.exit(main())
