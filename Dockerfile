# Granite 4.0 H micro SageMaker inference image. One file, two flavors; every application layer
# (the `image` stage at the bottom) is shared, so testing the CPU flavor proves it for both.
#
#   CUDA (default; ml.g5 / ml.g6e / ml.p4d / ml.p5):
#     docker build -t granite-h-sagemaker:cuda .
#   CPU (air-gapped style: torch and every dependency come from a local wheelhouse):
#     docker buildx build --build-arg FLAVOR=cpu --build-context wheelhouse=WHEELHOUSE_DIR \
#         -t granite-h-sagemaker:cpu .
#     (`make image-cpu` fills the wheelhouse first; podman build takes the same flags.)
#
# Run: `docker run IMAGE serve` (what SageMaker does) or `docker run IMAGE batch --input ... --output ...`.

ARG FLAVOR=cuda
ARG CUDA_BUILDER_BASE=nvidia/cuda:12.8.1-devel-ubuntu24.04
ARG CUDA_RUNTIME_BASE=nvidia/cuda:12.8.1-base-ubuntu24.04
ARG CPU_BASE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
# CUDA builder: a venv with torch and the prebuilt mamba-ssm / causal-conv1d kernel wheels.
# ---------------------------------------------------------------------------------------------
FROM ${CUDA_BUILDER_BASE} AS cuda-builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# torch 2.10.0 from PyPI is the CUDA 12.8 build with the C++11 ABI. The kernel releases below
# publish prebuilt wheels for exactly (cu12, torch 2.10, cxx11abi TRUE, cp312, linux_x86_64).
ARG TORCH_VERSION=2.10.0
ARG KERNEL_WHEEL_TAG=cu12torch2.10cxx11abiTRUE-cp312-cp312-linux_x86_64
ARG MAMBA_SSM_VERSION=2.3.2.post1
ARG MAMBA_SSM_SHA256=7a67070c1e7e99c95abd1319623f044e8a1b3fb46f774bfdea949f0a4fc79638
ARG CAUSAL_CONV1D_VERSION=1.6.2.post1
ARG CAUSAL_CONV1D_SHA256=c16c1c48d4fa63415cc797e02d69f97248c57c04627d99e394d5bb0ef266e288
# 1: compile the kernels from source instead (needs this devel base; 30-60 min). Only for a
# torch/CUDA/Python combination the releases publish no wheel for.
ARG KERNELS_FROM_SOURCE=0
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY serve/container/requirements.txt serve/container/constraints.txt /tmp/req/
RUN pip install "torch==${TORCH_VERSION}" einops==0.8.1 \
        -r /tmp/req/requirements.txt -c /tmp/req/constraints.txt
# The kernels come from the exact release-asset URLs (their setup.py would guess a URL and, on a
# miss, silently compile for half an hour): a .whl URL can only be installed, never built, and
# the sha256 fragment pins the bytes. --no-deps: their other requirements (tilelang,
# quack-kernels, ...) serve Mamba-3 only and would pull in another torch.
RUN if [ "${KERNELS_FROM_SOURCE}" = "1" ]; then \
        pip install ninja==1.11.1.4 packaging==25.0 wheel==0.45.1 setuptools==80.9.0 \
        && MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS="$(nproc)" \
           pip install --no-deps --no-build-isolation --no-binary=:all: \
               "causal-conv1d==${CAUSAL_CONV1D_VERSION}" "mamba-ssm==${MAMBA_SSM_VERSION}"; \
    else \
        pip install --no-deps --no-build-isolation \
            "https://github.com/Dao-AILab/causal-conv1d/releases/download/v${CAUSAL_CONV1D_VERSION}/causal_conv1d-${CAUSAL_CONV1D_VERSION}%2B${KERNEL_WHEEL_TAG}.whl#sha256=${CAUSAL_CONV1D_SHA256}" \
            "https://github.com/state-spaces/mamba/releases/download/v${MAMBA_SSM_VERSION}/mamba_ssm-${MAMBA_SSM_VERSION}%2B${KERNEL_WHEEL_TAG}.whl#sha256=${MAMBA_SSM_SHA256}"; \
    fi
# Build-time import check (no GPU needed): the compiled extensions load against this torch, and
# the Triton kernels the engine uses import.
COPY serve/container/check_kernels.py /tmp/check_kernels.py
RUN python /tmp/check_kernels.py

# ---------------------------------------------------------------------------------------------
# CUDA runtime dependencies: no compiler toolchain for CUDA, only what serving needs.
# ---------------------------------------------------------------------------------------------
FROM ${CUDA_RUNTIME_BASE} AS cuda-deps
# The user-space driver for hosts whose driver is older than CUDA 12.8 (serve/container/entrypoint.sh
# switches to it only then); from NVIDIA's apt repository, which the nvidia/cuda bases configure.
ARG CUDA_COMPAT_PACKAGE=cuda-compat-12-8
ENV DEBIAN_FRONTEND=noninteractive
# python3: the venv's interpreter (same Ubuntu release as the builder, so the same path).
# gcc + libc6-dev + python3-dev: Triton compiles a small C launcher on first use of a kernel.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev "${CUDA_COMPAT_PACKAGE}" \
    && rm -rf /var/lib/apt/lists/*
COPY --from=cuda-builder /opt/venv /opt/venv
COPY serve/container/check_kernels.py /opt/program/serve/container/check_kernels.py

# ---------------------------------------------------------------------------------------------
# CPU runtime dependencies, installed offline from the wheelhouse build context.
# ---------------------------------------------------------------------------------------------
FROM ${CPU_BASE} AS cpu-deps
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG TORCH_CPU_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY serve/container/requirements.txt serve/container/constraints.txt /tmp/req/
# The wheelhouse is bind-mounted, not copied: its ~250 MB of wheels never become an image layer.
RUN --mount=type=bind,from=wheelhouse,target=/wheelhouse \
    python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-index --find-links=/wheelhouse "torch==${TORCH_CPU_VERSION}" \
        -r /tmp/req/requirements.txt -c /tmp/req/constraints.txt \
    && /opt/venv/bin/python -c "import torch; assert torch.version.cuda is None, torch.version.cuda"

# ---------------------------------------------------------------------------------------------
# The application: identical for both flavors.
# ---------------------------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM ${FLAVOR}-deps AS image
# Every cache goes under /tmp (writable even as non-root; /opt/ml/model is read-only on SageMaker).
# Nothing is downloaded at import time: the `kernels` package (Hub kernel downloads in
# transformers) is not installed, and the model is fetched only when HF_MODEL_ID asks for it.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/program \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/tmp/hf \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TRITON_CACHE_DIR=/tmp/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    XDG_CACHE_HOME=/tmp/.cache \
    MODEL_CACHE_DIR=/tmp/granite-h-cache \
    MODEL_DIR=/opt/ml/model
LABEL com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true \
      org.opencontainers.image.title="granite-h-sagemaker" \
      org.opencontainers.image.description="IBM Granite 4.0 H micro on SageMaker: continuous batching for the hybrid Mamba-2/attention model"
# SageMaker runs inference containers as root (AWS: "SageMaker AI expects all containers to run
# with root users"), so root stays the default user; the unprivileged `granite` user is there for
# local runs (`docker run --user granite ...`), which the container test exercises. (A system
# uid: Ubuntu 24.04 bases already have uid 1000.)
RUN useradd --system --create-home --home-dir /home/granite --shell /usr/sbin/nologin granite
COPY --chmod=0755 serve/container/entrypoint.sh /usr/local/bin/granite-entrypoint
COPY model/ /opt/program/model/
COPY serve/ /opt/program/serve/
# Fail the build, not the endpoint, if the application cannot even be imported.
RUN python -c "import serve.app, serve.batch, serve.sign, model.engine, model_signing.signing, model_signing.verifying" \
    && python -m compileall -q /opt/program/serve /opt/program/model
WORKDIR /opt/program
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/granite-entrypoint"]
CMD ["serve"]
