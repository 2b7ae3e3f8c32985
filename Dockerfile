# syntax=docker/dockerfile:1
# trio-gpu-plugin image: pure Python on python:3.11-slim, no compiler in either stage.
# Build (tag = the package version, trio_gpu_plugin/_version.py; placeholder registry):
#   docker build --build-arg REVISION="$(git rev-parse HEAD)" \
#     -t ghcr.io/example/trio-gpu-plugin:0.1.0.dev0 .
#
# Reproducible: both stages start from one base image pinned by digest, and every Python
# package the image installs is pinned in k8s/constraints.txt (tests/test_deploy.py
# holds the two to each other, to setup.cfg and to the version).
# The digest is python:3.11-slim's multi-platform index on Docker Hub, as public
# Dockerfiles pin it (found by code search; pull it once to check it still resolves).
# To update it: `docker buildx imagetools inspect python:3.11-slim` (its "Digest:"
# line) or `crane digest python:3.11-slim`, then replace it in both FROM lines and in
# the base.digest label below.

# ---- build: our wheel and every dependency's (binary wheels from the index; nothing is
# compiled: slim ships no compiler and we never install one).
FROM python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7 AS build
# The package version this image is tagged with; the build fails if the source says
# otherwise, so a tag never names other code.
ARG VERSION=0.1.0.dev0
# PIP_CONSTRAINT rather than `-c`: pip passes it on to the isolated environment that
# installs the build backend, which `-c` does not reach.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PIP_CONSTRAINT=/src/constraints.txt
WORKDIR /src
COPY k8s/constraints.txt ./constraints.txt
COPY pyproject.toml setup.cfg README.md ./
COPY trio_gpu_plugin ./trio_gpu_plugin
RUN pip wheel --wheel-dir /wheels '.[metrics]' \
    && if [ ! -f "/wheels/trio_gpu_plugin-${VERSION}-py3-none-any.whl" ]; then \
         echo "error: --build-arg VERSION=${VERSION} is not the package version; built:" \
           /wheels/trio_gpu_plugin-*.whl >&2; \
         exit 1; \
       fi

# ---- runtime
FROM python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7
ARG VERSION=0.1.0.dev0
# The commit built (OCI revision label); pass --build-arg REVISION="$(git rev-parse HEAD)".
ARG REVISION=
# Where the source lives (OCI source label): set it to your repository's URL.
ARG SOURCE=https://github.com/example/trio-gpu-plugin
LABEL org.opencontainers.image.title="trio-gpu-plugin" \
      org.opencontainers.image.description="A Kubernetes device plugin for NVIDIA GPUs, written in Python on trio" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim" \
      org.opencontainers.image.base.digest="sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# Installed from the build stage's wheels only (--no-index), held to the same
# constraints: the runtime stage never reaches an index, and the wheels are
# bind-mounted, so they add no layer.
# PYTHONDONTWRITEBYTECODE is deliberately not set: pip compiles the bytecode at install,
# and the pod's root filesystem is read-only, so every start would otherwise recompile
# the plugin and its dependencies (more start-up CPU under the 200m limit).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    --mount=type=bind,from=build,source=/src/constraints.txt,target=/constraints.txt \
    pip install --no-index --find-links /wheels --constraint /constraints.txt \
      "trio-gpu-plugin[metrics]==${VERSION}"
# What the NVIDIA container runtime should give us (as NVIDIA's image and chart).
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# Root, as NVIDIA's image: the kubelet's device-plugins directory is a root-owned hostPath
# we create sockets in. k8s/daemonset.yaml drops every capability and forbids privilege
# escalation, so this root is the directory's owner and little else.
USER 0
EXPOSE 9402
# The pip install above also puts `nvidia-device-plugin` (the same program, NVIDIA's
# name) on PATH, for NVIDIA's Helm chart, whose container command is that name.
ENTRYPOINT ["trio-gpu-plugin"]
