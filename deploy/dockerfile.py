"""A small Dockerfile parser: enough to check the image against the Kubernetes manifests.

It follows the Dockerfile reference for what it reads: parser directives (`# escape=`),
comment lines, line continuations, the exec (JSON) and shell forms, `ARG` before the first
`FROM` (the global build arguments), `${VAR}`/`${VAR:-default}` substitution in `FROM`, and
stages (`FROM image AS name`, a stage built `FROM` another stage). Heredocs are not
supported (the project's Dockerfile uses none).
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9_-]*)\s*=\s*(.*?)\s*$")
_VAR = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class DockerfileError(ValueError):
    """Text that is not a Dockerfile this parser understands."""


@dataclass(frozen=True)
class Instruction:
    """One instruction: its keyword (upper case), its arguments (continuations joined)
    and the line where it starts."""

    keyword: str
    value: str
    line: int

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON-array (exec) form's arguments, or None for the shell form."""
        text = self.value.strip()
        if not text.startswith("["):
            return None
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            return None
        if isinstance(parsed, list) and all(isinstance(x, str) for x in parsed):
            return parsed
        return None

    def flags_and_rest(self) -> tuple[dict[str, str], str]:
        """Leading `--name=value` flags (COPY --from=..., HEALTHCHECK --interval=...) and
        the text after them."""
        flags: dict[str, str] = {}
        rest = self.value.strip()
        while rest.startswith("--"):
            token, _, rest = rest.partition(" ")
            name, _, value = token[2:].partition("=")
            flags[name] = value
            rest = rest.strip()
        return flags, rest


@dataclass
class Stage:
    """A build stage: `FROM base [AS name]` and the instructions after it."""

    index: int
    base: str
    name: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        """Every instruction of this stage with the keyword."""
        return [i for i in self.instructions if i.keyword == keyword.upper()]

    def last(self, keyword: str) -> Instruction | None:
        """The stage's last instruction with the keyword (the one in effect)."""
        found = self.all(keyword)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    """A parsed Dockerfile."""

    instructions: list[Instruction]
    global_args: dict[str, str | None]
    stages: list[Stage]
    escape: str = "\\"

    @property
    def final(self) -> Stage:
        """The last stage: what `docker build` produces without --target."""
        if not self.stages:
            raise DockerfileError("no FROM instruction")
        return self.stages[-1]

    def stage(self, name: str) -> Stage | None:
        """The stage called `name` (case-insensitive), or None."""
        for s in self.stages:
            if s.name and s.name.lower() == name.lower():
                return s
        return None

    def substitute(self, text: str, overrides: dict[str, str] | None = None) -> str:
        """`text` with the global build arguments substituted (`--build-arg` overrides)."""
        values = {k: v for k, v in self.global_args.items() if v is not None}
        values.update(overrides or {})

        def repl(m: re.Match[str]) -> str:
            name = m.group("braced") or m.group("bare")
            if name in values:
                return values[name]
            default = m.group("default")
            return default if default is not None else ""

        return _VAR.sub(repl, text)

    def base_image(self, stage: Stage, overrides: dict[str, str] | None = None) -> str:
        """The stage's FROM, build arguments substituted."""
        return self.substitute(stage.base, overrides)

    def chain(self, stage: Stage, overrides: dict[str, str] | None = None) -> list[Stage]:
        """The stage and the stages it is built on, nearest first (for one set of build
        arguments). An external image ends the chain."""
        out = [stage]
        current = stage
        while True:
            parent = self.stage(self.base_image(current, overrides))
            if parent is None or parent in out:
                return out
            out.append(parent)
            current = parent

    def effective(
        self, keyword: str, stage: Stage | None = None, overrides: dict[str, str] | None = None
    ) -> Instruction | None:
        """The instruction (ENTRYPOINT, CMD, USER, HEALTHCHECK ...) in effect for a stage,
        inherited from the stages below it."""
        for s in self.chain(stage or self.final, overrides):
            found = s.last(keyword)
            if found is not None:
                return found
        return None

    def env(
        self, stage: Stage | None = None, overrides: dict[str, str] | None = None
    ) -> dict[str, str]:
        """The environment a stage's image sets (ENV of the stage and the stages below)."""
        merged: dict[str, str] = {}
        for s in reversed(self.chain(stage or self.final, overrides)):
            for ins in s.all("ENV"):
                merged.update(parse_env(ins.value))
        return merged

    def exposed_ports(
        self, stage: Stage | None = None, overrides: dict[str, str] | None = None
    ) -> set[int]:
        """Every TCP port a stage EXPOSEs (inherited EXPOSEs included)."""
        ports: set[int] = set()
        for s in self.chain(stage or self.final, overrides):
            for ins in s.all("EXPOSE"):
                ports |= parse_expose(self.substitute(ins.value, overrides))
        return ports


def parse_env(value: str) -> dict[str, str]:
    """`ENV a=1 b="two words"` (or the legacy `ENV key value`) as a dict."""
    tokens = shlex.split(value, posix=True)
    if tokens and "=" not in tokens[0]:
        return {tokens[0]: " ".join(tokens[1:])}
    out: dict[str, str] = {}
    for token in tokens:
        key, sep, val = token.partition("=")
        if not sep:
            raise DockerfileError(f"ENV {value!r}: {token!r} is not KEY=VALUE")
        out[key] = val
    return out


def parse_expose(value: str) -> set[int]:
    """`EXPOSE 50051 9100-9104/tcp 53/udp` -> the TCP ports."""
    ports: set[int] = set()
    for token in value.split():
        spec, _, proto = token.partition("/")
        if proto and proto.lower() != "tcp":
            continue
        low, _, high = spec.partition("-")
        try:
            start, end = int(low), int(high or low)
        except ValueError as exc:
            raise DockerfileError(f"EXPOSE {token!r} is not a port") from exc
        ports.update(range(start, end + 1))
    return ports


def _logical_lines(text: str) -> tuple[list[tuple[int, str]], str]:
    """(line number, instruction text) pairs with comments dropped and continuations
    joined, and the escape character."""
    lines = text.splitlines()
    escape = "\\"
    # Parser directives: only at the very top, before any instruction or blank line.
    for raw in lines:
        m = _DIRECTIVE.match(raw.strip())
        if not m:
            break
        if m.group(1).lower() == "escape":
            escape = m.group(2)
            if escape not in ("\\", "`"):
                raise DockerfileError(f"escape={escape!r}: must be \\ or `")
    out: list[tuple[int, str]] = []
    current: list[str] = []
    start = 0
    for number, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if stripped.startswith("#"):
            continue  # comments, also inside a continued instruction
        if not stripped:
            continue  # blank lines, also inside a continuation (Docker drops them too)
        if not current:
            start = number
        if stripped.endswith(escape):
            current.append(stripped[: -len(escape)].strip())
            continue
        current.append(stripped)
        out.append((start, " ".join(p for p in current if p)))
        current = []
    if current:
        out.append((start, " ".join(p for p in current if p)))
    return out, escape


def parse(text: str) -> Dockerfile:
    """Parse Dockerfile text."""
    logical, escape = _logical_lines(text)
    instructions: list[Instruction] = []
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for number, line in logical:
        keyword, _, value = line.partition(" ")
        if not re.fullmatch(r"[A-Za-z]+", keyword):
            raise DockerfileError(f"line {number}: {keyword!r} is not an instruction")
        if keyword.upper() in ("RUN", "COPY") and re.search(r"<<-?[\"']?[A-Za-z_]", value):
            raise DockerfileError(f"line {number}: heredocs are not supported")
        ins = Instruction(keyword.upper(), value.strip(), number)
        instructions.append(ins)
        if ins.keyword == "FROM":
            _flags, rest = ins.flags_and_rest()  # --platform=...
            parts = rest.split()
            if not parts:
                raise DockerfileError(f"line {number}: FROM without an image")
            name = None
            if len(parts) == 3 and parts[1].lower() == "as":
                name = parts[2]
            elif len(parts) != 1:
                raise DockerfileError(f"line {number}: FROM {rest!r}: expected IMAGE [AS NAME]")
            stages.append(Stage(len(stages), parts[0], name, number))
        elif not stages:
            if ins.keyword != "ARG":
                raise DockerfileError(f"line {number}: {ins.keyword} before the first FROM")
            for token in shlex.split(ins.value):
                key, sep, default = token.partition("=")
                global_args[key] = default if sep else None
        else:
            stages[-1].instructions.append(ins)
    if not stages:
        raise DockerfileError("no FROM instruction")
    return Dockerfile(instructions, global_args, stages, escape)


def load(path: Path) -> Dockerfile:
    """Parse a Dockerfile from disk."""
    return parse(path.read_text(encoding="utf-8"))
