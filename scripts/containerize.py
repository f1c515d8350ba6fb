"""`bentoml containerize`, with a lean two-stage Containerfile in place of BentoML's one stage.

BentoML (1.4, Bento spec 2) renders one stage from its template base_v2.j2: it installs
build-essential and git on Debian (the first of the image's commands), installs uv with pip, and
keeps apt's downloaded packages. The runtime needs none of them. This renders the same template
with two blocks overridden:

- build stage ("base-container", BentoML's own): its commands without that default package
  install, uv, the virtual environment in /app and the Bento; the test suites of the installed
  packages are deleted;
- runtime stage: RUNTIME_BASE (empty: the build's base image), BentoML's user (uid 1034), its
  environment (BENTO_PATH, BENTOML_HOME, the Bento's envs...), /app and the Bento copied from the
  build stage, BentoML's entrypoint. The image's other commands (system_packages) run there too.

Everything else (build context with the models, backend, its options, tags) is BentoML's: the
arguments after RUNTIME_BASE are those of `bentoml containerize`.

usage: python scripts/containerize.py RUNTIME_BASE BENTO_TAG [bentoml containerize options...]
"""

from __future__ import annotations

import sys
import typing as t
from pathlib import Path

import _bentoml_impl.docker as bentoml_docker
import attr
from bentoml._internal.container.frontend.dockerfile import CONTAINER_METADATA
from bentoml._internal.container.generate import build_environment

# Block names and variables are those of bentoml/_internal/container/frontend/dockerfile/
# templates/base_v2.j2 (bentoml==1.4.40, pinned in bentofile.yaml).
TEMPLATE = """\
{% extends "base_v2.j2" %}
{% block SETUP_BENTO_COMPONENTS %}
{{ super() }}
# tailorgpt: the packages' test suites are not served.
RUN find /app -depth -type d -name tests -path '*/site-packages/*' -exec rm -rf {} +

{% endblock %}
{% block SETUP_BENTO_ENTRYPOINT %}
# tailorgpt: the runtime stage, without the build's compiler, uv, pip caches and apt downloads.
FROM {{ tailorgpt_runtime_base | default(__options__base_image, true) | normalize_line }} AS runtime

ENV LANG=C.UTF-8

ENV LC_ALL=C.UTF-8

ENV PYTHONIOENCODING=UTF-8

ENV PYTHONUNBUFFERED=1
{% if tailorgpt_runtime_commands %}

RUN {{ tailorgpt_runtime_commands }}
{% endif %}
{{ self.SETUP_BENTO_USER() }}
{{ self.SETUP_BENTO_ENVARS() }}
COPY --from=base-container /app /app
ENV VIRTUAL_ENV=/app/.venv
ENV PATH=/app/.venv/bin:${PATH}
{% set owner = bento__user ~ ":" ~ bento__user %}
COPY --from=base-container --chown={{ owner }} {{ bento__path }} {{ bento__path }}

{{ super() }}
{% endblock %}
"""

DEFAULT_INSTALLS = {meta["default_install_command"] for meta in CONTAINER_METADATA.values()}


def runtime_commands(commands: list[str]) -> str:
    """The image's own commands as one RUN line for the runtime stage ("" when none)."""
    if not commands:
        return ""
    if any(c.startswith("apt-get ") for c in commands):
        # BentoML's default install ran `apt-get update` before them; its lists are left out.
        commands = ["apt-get update", *commands, "rm -rf /var/lib/apt/lists/*"]
    return " && \\\n    ".join(commands)


def lean_dockerfile(image: t.Any, bento_fs: Path, *, runtime_base: str, **bento_envs: t.Any) -> str:
    commands = [c for c in image.commands if c not in DEFAULT_INSTALLS]
    own = runtime_commands(commands)
    image = attr.evolve(image, commands=[own] if own else [])
    variables = bentoml_docker.get_templates_variables(image, bento_fs, **bento_envs)
    variables.update(tailorgpt_runtime_base=runtime_base, tailorgpt_runtime_commands=own)
    return build_environment().from_string(TEMPLATE).render(**variables)


def use_lean_dockerfile(runtime_base: str) -> None:
    """Make BentoML render lean_dockerfile for spec-2 Bentos from now on, in this process."""

    def generate_dockerfile(
        image: t.Any, bento_fs: Path, *, frontend: str = "dockerfile", **envs: t.Any
    ) -> str:
        return lean_dockerfile(image, bento_fs, runtime_base=runtime_base, **envs)

    # construct_containerfile imports it from this module when it builds a spec-2 Bento.
    bentoml_docker.generate_dockerfile = generate_dockerfile


def render(bento_tag: str, runtime_base: str = "") -> str:
    """The Containerfile `containerize` builds for a stored Bento, without building it."""
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.container import construct_containerfile

    use_lean_dockerfile(runtime_base)
    bento = BentoMLContainer.bento_store.get().get(bento_tag)
    with construct_containerfile(bento, enable_buildkit=False) as (_, dockerfile):
        return Path(dockerfile).read_text()


def main() -> int:
    runtime_base, *args = sys.argv[1:]
    use_lean_dockerfile(runtime_base)
    from bentoml_cli.cli import cli

    return cli(["containerize", *args])


if __name__ == "__main__":
    sys.exit(main())
