# syntax=docker/dockerfile:1
#
# casa-live: the websocket captioning server on the bundled CASA model.
#
#   docker build -t casa-live .                                   # slim CPU image (default)
#   docker build -t casa-live:cuda --build-arg TORCH_VARIANT=cu128 .   # CUDA torch wheel + Triton kernels
#   docker run --rm -p 8000:8000 casa-live                        # demo page on http://127.0.0.1:8000
#   docker run --rm -p 8000:8000 -v "$PWD/my-model:/models/my-model:ro" \
#       -e CASA_MODEL_DIR=/models/my-model casa-live
#
# The base is Debian's slim image with Debian's own python3 in a venv at /opt/venv. An image built
# from a plain `debootstrap --variant=minbase bookworm` root is the same system, so the image can be
# built and tested where no image registry is reachable (BASE_IMAGE, see docs/operations.md).
#
# Stages: `python` (the OS and an empty venv), `wheel` (builds the casa-live wheel from the context),
# and the runtime image. The runtime layers go from least to most often changed: system packages
# and user, torch, the other dependencies (read from pyproject.toml alone, so editing code does not
# reinstall them), then the wheel. The image has no source tree: the package, the demo page and the
# bundled model are installed from the wheel, as `pip install casa-live` would.

ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS python

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Debian's python3 (3.11 on bookworm) is the interpreter; its packages stay untouched and the
# server's live in the venv. The versions come with the base release, hence unpinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv


FROM python AS wheel

# The same wheel `pip wheel .` builds anywhere; setuptools comes from the package index (build
# isolation), at the version pyproject.toml's build-system asks for.
# The CPU decode attention kernel (kernels/cpu_attention.c) is built here too, with this stage's
# compiler, so that the runtime image loads it without one (x86-64 only: it is AVX2 code; elsewhere
# the torch path runs). The builder script needs neither torch nor casa-live.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY . /src
RUN pip wheel --no-deps --wheel-dir /dist /src \
    && mkdir -p /kernels \
    && if [ "$(uname -m)" = x86_64 ]; then python /src/kernels/cpu_attention.py /kernels; fi


FROM python

LABEL org.opencontainers.image.title="casa-live" \
      org.opencontainers.image.description="Streaming video captioning server on CASA vision-language models" \
      org.opencontainers.image.licenses="MIT"

# Where torch comes from. TORCH_VARIANT picks the PyTorch index: cpu is the CPU wheel (a plain
# `pip install torch` would pull a multi-GB CUDA build); cu126, cu128, ... the CUDA wheel of the same
# release, which bundles the CUDA runtime, so the host needs only the NVIDIA driver and the container
# toolkit (`docker run --gpus all`). TORCH_INDEX_URL replaces the index and TORCH_FIND_LINKS adds a
# directory (or page) of wheels, e.g. a wheel directory mounted into the build where the PyTorch
# index cannot be reached; the other steps do not change.
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ARG TORCH_FIND_LINKS=

# Triton builds its small CUDA launcher (a Python C extension) with the system compiler the first
# time a kernel runs, so the CUDA image carries gcc and the Python headers. The CPU image never
# imports Triton and stays without a compiler. PyAV's wheel bundles FFmpeg: no apt ffmpeg in either
# image. Unpinned on purpose: any bookworm gcc builds the launcher, and a pinned version breaks at
# each point release.
# hadolint ignore=DL3008
RUN if [ "${TORCH_VARIANT}" != "cpu" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends gcc libc6-dev python3-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --no-log-init --uid 10001 --user-group --create-home --home-dir /home/casa \
        --shell /usr/sbin/nologin casa \
    && install -d -o 10001 -g 10001 /models

# The CUDA wheels depend on their matching Triton build, which comes along here. The wheel's C++
# headers, test binaries and test data (about 200 MB) serve building extensions and testing torch;
# the server never loads them (no torch.compile, no C++ extensions), so they go in the same layer.
RUN PIP_FIND_LINKS="${TORCH_FIND_LINKS}" pip install --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" \
    && torch_dir="$(python -c 'import os, torch; print(os.path.dirname(torch.__file__))')" \
    && rm -rf "${torch_dir}/include" "${torch_dir}/test" \
    && find "${torch_dir}/bin" -mindepth 1 -not -name torch_shm_manager -delete

# The remaining runtime dependencies, straight from pyproject.toml (torch is already satisfied).
COPY pyproject.toml /tmp/pyproject.toml
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("/tmp/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt /tmp/pyproject.toml

# casa-live itself, from the wheel stage; `pip check` fails the build if anything it needs is missing.
# The wheel is the one built above, so there is no version to pin.
COPY --from=wheel /dist/ /tmp/dist/
# hadolint ignore=DL3013
RUN pip install --no-deps /tmp/dist/*.whl \
    && rm -rf /tmp/dist \
    && pip check
# the prebuilt CPU decode attention kernel, where the server looks for it (kernels/cpu_attention.py)
COPY --from=wheel /kernels/ /opt/casa/kernels/
ENV CASA_KERNEL_CACHE=/opt/casa/kernels

# Mount other models under /models (read-only is enough) and set CASA_MODEL_DIR=/models/NAME
# (or pass --model-dir). Unset, the server loads the bundled model from the installed package.
# No VOLUME instruction: it would create an anonymous volume on every run for a directory that
# is only ever bind-mounted.
USER 10001:10001
ENV HOME=/home/casa
WORKDIR /home/casa

EXPOSE 8000

# /healthz answers as soon as the process serves HTTP; the model load and warm-up happen before
# that, hence the start period. The slim image has no curl: the probe is Python's urllib.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]

# `casa serve` starts uvicorn with per-message deflate off: compressing every caption delta costs
# latency on each message for a few bytes saved.
CMD ["casa", "serve", "--host", "0.0.0.0", "--port", "8000"]
