"""The container image: the Dockerfile on its own, and against the manifests."""

from __future__ import annotations

import re

from deploy.dockerfile import Dockerfile, parse_env
from deploy.policy.model import (
    ALL_IN_ONE,
    SERVICES,
    UID,
    Bundle,
    all_containers,
    effective_env,
    located,
    named_ports,
    pod_template,
    split_image,
)

# Dockerfile ------------------------------------------------------------------------------

_BUILD_TOOLS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|make|cmake|cc|[a-z0-9.+-]+-dev)\b")
VARIANTS = ("gpu", "cpu")


def _apt_packages(run: str) -> list[str]:
    """Packages an `apt-get install` in a RUN line installs."""
    out: list[str] = []
    for m in re.finditer(r"apt-get\s+install\s+([^&|;]*)", run):
        out += [t for t in m.group(1).split() if not t.startswith("-") and "$" not in t]
    return out


def _pinned_base(image: str) -> bool:
    _repo, tag, digest = split_image(image)
    if digest:
        return True
    return tag is not None and tag != "latest" and bool(re.search(r"\d+\.\d+\.\d+", tag))


def check_dockerfile(bundle: Bundle) -> list[str]:
    """The image (both VARIANTs): base images pinned by full version tag, no build tools in
    the final stage, uid 10001, `ENTRYPOINT ["percept", "serve"]`, a gRPC-health
    HEALTHCHECK (`percept health`), HF_HUB_OFFLINE=1, pillow-simd built in a builder stage
    and copied as a wheel, torch and faiss pinned, and the commit it is built from in
    ENV PERCEPT_GIT_SHA (from `ARG PERCEPT_GIT_SHA` in the final stage), which a model
    trained in the image records (the image has no .git)."""
    d = bundle.dockerfile
    if d is None:
        return ["no Dockerfile loaded"]
    failures = []
    if d.global_args.get("VARIANT") not in VARIANTS:
        failures.append(f"ARG VARIANT defaults to {d.global_args.get('VARIANT')!r}, want gpu|cpu")
    for variant in VARIANTS:
        args = {"VARIANT": variant}
        chain = d.chain(d.final, args)
        external = d.base_image(chain[-1], args)
        if d.stage(external) is not None or "$" in external:
            failures.append(f"VARIANT={variant}: final stage base {external!r} does not resolve")
        for stage in d.stages:
            base = d.base_image(stage, args)
            if d.stage(base) is None and not _pinned_base(base):
                failures.append(
                    f"line {stage.line}: base image {base!r} is not pinned by a full tag"
                )
        for stage in chain:
            for run in stage.all("RUN"):
                tools = [p for p in _apt_packages(run.value) if _BUILD_TOOLS.fullmatch(p)]
                if tools:
                    failures.append(
                        f"VARIANT={variant}: the final image installs build tools "
                        f"{tools} (line {run.line})"
                    )
    user = d.effective("USER")
    uid = user.value.split(":")[0] if user else ""
    if uid != str(UID):
        failures.append(f"USER is {user.value if user else None!r}, want numeric {UID}")
    entry = d.effective("ENTRYPOINT")
    if entry is None or entry.exec_form != ["percept", "serve"]:
        failures.append(
            f'ENTRYPOINT is {entry.value if entry else None!r}, want ["percept", "serve"]'
        )
    cmd = d.effective("CMD")
    if cmd is None or not cmd.exec_form or cmd.exec_form[0] not in {*SERVICES, ALL_IN_ONE.name}:
        failures.append(f"CMD is {cmd.value if cmd else None!r}, want a service name in exec form")
    health = d.effective("HEALTHCHECK")
    if health is None or "percept health" not in health.value:
        failures.append("no HEALTHCHECK with `percept health` (grpc.health.v1)")
    if d.env().get("HF_HUB_OFFLINE") != "1":
        failures.append("ENV HF_HUB_OFFLINE=1 is missing")
    wheel_stages = [
        s
        for s in d.stages
        if any("pip wheel" in r.value and "pillow-simd==" in r.value for r in s.all("RUN"))
    ]
    if not wheel_stages:
        failures.append("pillow-simd is not built as a wheel (pip wheel pillow-simd==...)")
    else:
        names = {s.name for s in wheel_stages}
        copied = any(
            ins.flags_and_rest()[0].get("from") in names
            for s in d.stages
            if s not in wheel_stages
            for ins in s.all("COPY")
        )
        if not copied:
            failures.append("the pillow-simd wheel is never copied out of its builder stage")
        for s in wheel_stages:
            if s in d.chain(d.final, {"VARIANT": "gpu"}) or s in d.chain(
                d.final, {"VARIANT": "cpu"}
            ):
                failures.append(f"the final image is built on the compiler stage {s.name}")
    text = " ".join(i.value for i in d.instructions)
    for pin in ("torch==2.11.0", "torch==2.13.0", "faiss-gpu==1.15.1", "faiss-cpu==1.15.1"):
        if pin not in text:
            failures.append(f"{pin} is not pinned")
    if "training.assets fetch" not in text:
        failures.append(
            "the image does not fetch the offline assets (python -m training.assets fetch)"
        )
    failures += _noun_vectors_built(d)
    failures += _git_sha_recorded(d)
    return failures


def _git_sha_recorded(d: Dockerfile) -> list[str]:
    """training/export.py's git_sha() falls back to $PERCEPT_GIT_SHA where there is no .git
    (.dockerignore keeps it out of the image): the final stage must take the commit as a
    build argument (`--build-arg PERCEPT_GIT_SHA=$(git rev-parse HEAD)`) and keep it in its
    environment, or every model trained in the cluster records "uncommitted"."""
    name = "PERCEPT_GIT_SHA"
    arg_at = [
        i.line
        for i in d.final.all("ARG")
        if any(t.partition("=")[0] == name for t in i.value.split())
    ]
    env_at = [
        i.line
        for i in d.final.all("ENV")
        if parse_env(i.value).get(name) in (f"${name}", f"${{{name}}}")
    ]
    if not arg_at or not env_at:
        return [f"the final stage does not record the commit: want `ARG {name}` and "
                f"`ENV {name}=${name}` (training/export.py reads it for a model's provenance)"]
    if min(arg_at) > max(env_at):
        return [f"ENV {name} (line {max(env_at)}) comes before ARG {name} (line {min(arg_at)}): "
                "it would be empty"]
    return []


def _noun_vectors_built(d: Dockerfile) -> list[str]:
    """The embed service reads the WordNet noun vectors from <app>/assets/vectors, and the
    image's /app is read-only at run time: a final image without them would build them at
    every start (minutes) and then fail to save them. They must be built after the assets
    are copied in, in a stage whose files reach the final image."""
    vectors = "/app/assets/vectors/"
    copied_from = set()
    for copy in d.final.all("COPY"):
        flags, rest = copy.flags_and_rest()
        sources = rest.split()[:-1]
        if any(vectors.startswith(source.rstrip("/") + "/") for source in sources):
            copied_from.add(flags.get("from"))
    for stage in d.stages:
        if stage is not d.final and stage.name not in copied_from:
            continue
        assets_at = [i.line for i in stage.all("COPY") if "/assets" in i.value]
        builds_at = [i.line for i in stage.all("RUN")
                     if "services.embed.word_vectors build" in i.value]
        if assets_at and builds_at and max(builds_at) > min(assets_at):
            return []
    return ["the image does not build the noun vectors after copying in the assets "
            "(python -m services.embed.word_vectors build): the embed service would build "
            "them at every start and fail to save them under a read-only /app"]


def check_image_contract(bundle: Bundle) -> list[str]:
    """The manifests run the image as built: servers keep its `percept serve` entrypoint
    with a service name, every container port is EXPOSEd, jobs call the `percept` console
    script, runAsUser and HOME match the image's USER and ENV."""
    d = bundle.dockerfile
    if d is None:
        return ["no Dockerfile loaded"]
    failures = []
    exposed = d.exposed_ports()
    user = d.effective("USER")
    image_uid = user.value.split(":")[0] if user else ""
    image_home = d.env().get("HOME")
    entry = d.effective("ENTRYPOINT") or None
    entrypoint = entry.exec_form if entry else None
    for res in bundle.workloads:
        spec = pod_template(res).spec
        for c in all_containers(spec):
            where = located(res, c)
            for p in c.ports or []:
                if p.container_port not in exposed:
                    failures.append(f"{where}: port {p.name} {p.container_port} is not EXPOSEd")
            if "grpc" in named_ports(c):
                if c.command:
                    failures.append(f"{where}: replaces the image entrypoint {entrypoint}")
                if entrypoint != ["percept", "serve"]:
                    failures.append(f"the image entrypoint {entrypoint} is not `percept serve`")
                if not c.args or c.args[0] not in {*SERVICES, ALL_IN_ONE.name}:
                    failures.append(f"{where}: args {c.args} name no service for `percept serve`")
            elif c.command and c.command[0] != "percept":
                failures.append(f"{where}: runs {c.command[0]!r}, not the image's percept CLI")
            run_as = (c.security_context.run_as_user if c.security_context else None) or (
                spec.security_context.run_as_user if spec.security_context else None
            )
            if str(run_as) != image_uid:
                failures.append(f"{where}: runAsUser {run_as} != the image's USER {image_uid}")
            home = effective_env(bundle, c).get("HOME")
            if home is not None and image_home is not None and home != image_home:
                failures.append(f"{where}: HOME {home} != the image's HOME {image_home}")
    return failures
