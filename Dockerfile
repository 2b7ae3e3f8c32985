# syntax=docker/dockerfile:1
# trio-gpu-plugin image: pure Python on python:3.11-slim, no compiler in either stage.
# Build: docker build -t ghcr.io/example/trio-gpu-plugin:0.1.0 .   (placeholder registry)
# Pin the base images by digest for reproducible builds in your registry.

# ---- build: our wheel and every dependency's (binary wheels from the index; nothing is
# compiled: slim ships no compiler and we never install one).
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY trio_gpu_plugin ./trio_gpu_plugin
RUN pip wheel --wheel-dir /wheels '.[metrics]'

# ---- runtime
FROM python:3.11-slim
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# Installed from the build stage's wheels only (--no-index): the runtime stage never
# reaches an index, and the wheels are bind-mounted, so they add no layer.
# PYTHONDONTWRITEBYTECODE is deliberately not set: pip compiles the bytecode at install,
# and the pod's root filesystem is read-only, so every start would otherwise recompile
# the plugin and its dependencies (more start-up CPU under the 200m limit).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels 'trio-gpu-plugin[metrics]'
# What the NVIDIA container runtime should give us (as NVIDIA's image and chart).
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# Root, as NVIDIA's image: the kubelet's device-plugins directory is a root-owned hostPath
# we create sockets in. k8s/daemonset.yaml drops every capability and forbids privilege
# escalation, so this root is the directory's owner and little else.
USER 0
EXPOSE 9402
ENTRYPOINT ["trio-gpu-plugin"]
