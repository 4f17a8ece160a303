# syntax=docker/dockerfile:1
#
# casa-live: the websocket captioning server on the bundled CASA model.
#
#   docker build -t casa-live .                                   # slim CPU image (default)
#   docker build -t casa-live:cuda --build-arg TORCH_VARIANT=cu128 .   # CUDA torch wheel + Triton kernels
#   docker run --rm -p 8000:8000 casa-live                        # demo page on http://127.0.0.1:8000
#   docker run --rm -p 8000:8000 -v "$PWD/my-model:/models/my-model:ro" \
#       casa-live casa serve --host 0.0.0.0 --model-dir /models/my-model
#
# Layers go from least to most often changed: system packages, torch, the other dependencies
# (read from pyproject.toml alone, so editing code does not reinstall them), then the source.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm

LABEL org.opencontainers.image.title="casa-live" \
      org.opencontainers.image.description="Streaming video captioning server on CASA vision-language models" \
      org.opencontainers.image.licenses="MIT"

# cpu: the CPU wheel (about 200 MB; a plain `pip install torch` would pull a multi-GB CUDA build).
# cu126, cu128, ...: the CUDA wheel of the same release; it bundles the CUDA runtime, so the host needs
# only the NVIDIA driver and the container toolkit (`docker run --gpus all`).
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Triton builds its small CUDA launcher with the system C compiler the first time a kernel runs, so
# the CUDA image carries gcc. The CPU image never imports Triton and stays without a compiler.
# PyAV's wheel bundles FFmpeg: no apt ffmpeg in either image. The compiler is left unpinned on
# purpose: any bookworm gcc builds the launcher, and a pinned version breaks at each point release.
# hadolint ignore=DL3008
RUN if [ "${TORCH_VARIANT}" != "cpu" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --no-log-init --uid 10001 --user-group --create-home --home-dir /home/casa \
        --shell /usr/sbin/nologin casa \
    && install -d -o 10001 -g 10001 /models

WORKDIR /app

# The CUDA wheels depend on their matching Triton build, which comes along here.
RUN pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        "torch==${TORCH_VERSION}"

# The remaining runtime dependencies, straight from pyproject.toml (torch is already satisfied).
COPY pyproject.toml ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The source and the bundled model (checkpoints/default). The editable install keeps the code in
# /app, where `casa serve` finds checkpoints/default by default.
COPY . .
RUN pip install --no-cache-dir --no-deps -e .

# Mount other models under /models (read-only is enough) and set CASA_MODEL_DIR=/models/NAME
# (or pass --model-dir).
# No VOLUME instruction: it would create an anonymous volume on every run for a directory that
# is only ever bind-mounted.
USER 10001:10001
ENV HOME=/home/casa

EXPOSE 8000

# /healthz answers as soon as the process serves HTTP; the model load and warm-up happen before
# that, hence the start period. The slim image has no curl: the probe is Python's urllib.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]

# `casa serve` starts uvicorn with per-message deflate off: compressing every caption delta costs
# latency on each message for a few bytes saved.
CMD ["casa", "serve", "--host", "0.0.0.0", "--port", "8000"]
