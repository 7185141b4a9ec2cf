# chatglm-serve: ChatGLM2-6B behind an OpenAI-compatible API.
#
# GPU image (default bases: the official PyTorch CUDA images):
#   docker compose build                      (or: docker build -t chatglm-serve:0.1.0 .)
# CPU image (any Debian/Ubuntu base with python3 >= 3.10 and venv; torch comes from TORCH_INDEX_URL
# or from wheels in WHEELS_IMAGE):
#   docker compose -f docker-compose.yml -f compose.cpu.yml build
#
# Build arguments:
#   BASE_IMAGE      runtime base; needs python3 (>= 3.10) with the venv module
#   BUILDER_IMAGE   builder base: the same Python at the same path as BASE_IMAGE (the virtual
#                   environment is copied across); with nvcc the CUDA kernels are compiled here
#   WHEELS_IMAGE    optional image whose root holds wheels (e.g. torch) that pip may use
#   TORCH_VERSION   torch installed when the base image has none (CPU bases)
#   TORCH_INDEX_URL extra package index for that torch (https://download.pytorch.org/whl/cpu)
#   TORCH_CUDA_ARCH_LIST  GPU architectures the kernels are compiled for
#   GXX_VERSION / PYTHON3_DEV_VERSION  apt versions of g++ and python3-dev, installed in the
#                   builder only where BUILDER_IMAGE lacks a compiler or the Python headers
# The builder compiles the kernels (`python -m chatglm_serve.kernels.build`: CPU always, CUDA with nvcc) into
# /opt/chatglm-serve/kernels; the runtime (no compiler, read-only root) imports them as built.
# Build secret (optional): `ca`, a CA bundle for pip (networks with a TLS-intercepting proxy).

ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
ARG BUILDER_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel
ARG WHEELS_IMAGE=scratch

FROM ${WHEELS_IMAGE} AS wheels

# ---------------------------------------------------------------------------------------------
FROM ${BUILDER_IMAGE} AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    CHATGLM_SERVE_CACHE=/opt/chatglm-serve/cache \
    CHATGLM_SERVE_KERNEL_CACHE=/opt/chatglm-serve/kernels \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}

# The kernels are compiled in this stage: it needs a C++ compiler and the Python headers. They are
# installed only where the base lacks them (the CUDA devel images have both); the versions are
# Debian bookworm's (python:*-bookworm and the local base), to be overridden for other bases.
ARG GXX_VERSION=4:12.2.0-3
ARG PYTHON3_DEV_VERSION=3.11.2-1+b1
RUN has_headers() { python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; }; \
    if ! command -v g++ >/dev/null 2>&1 || ! has_headers; then \
        echo "chatglm-serve: installing g++ / python3-dev (builder stage only) to compile the kernels"; \
        apt-get update; \
        if ! command -v g++ >/dev/null 2>&1; then \
            apt-get install -y --no-install-recommends "g++=${GXX_VERSION}" || exit 1; \
        fi; \
        if ! has_headers; then \
            apt-get install -y --no-install-recommends "python3-dev=${PYTHON3_DEV_VERSION}" || exit 1; \
        fi; \
        rm -rf /var/lib/apt/lists/*; \
    fi

# --system-site-packages: a CUDA base's own torch (built for its CUDA) is used as is.
RUN python3 -m venv --system-site-packages /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch: kept from the base image when it has one, else installed (wheels image first, then the
# package index). The CA bundle secret, when given, is what pip trusts.
RUN --mount=type=bind,from=wheels,target=/wheels \
    --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    if [ -n "${TORCH_INDEX_URL}" ]; then export PIP_EXTRA_INDEX_URL="${TORCH_INDEX_URL}"; fi; \
    if python -c 'import torch' 2>/dev/null; then \
        echo "torch $(python -c 'import torch; print(torch.__version__)') from the base image"; \
    else \
        pip install --find-links /wheels "torch==${TORCH_VERSION}"; \
    fi

# The pinned serving stack first: this layer outlives changes to the source.
COPY deploy/constraints.txt /src/deploy/constraints.txt
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    pip install --requirement /src/deploy/constraints.txt

COPY . /src/
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    pip install --constraint /src/deploy/constraints.txt /src \
    && pip check

WORKDIR /opt
# Compile the kernels now, into CHATGLM_SERVE_KERNEL_CACHE: the runtime image has no compiler and a
# read-only root, and imports these builds as they are (kernels/build.py). The CPU kernels always;
# the CUDA ones (for TORCH_CUDA_ARCH_LIST: no GPU needed) when this builder has nvcc. Only the
# libraries and their stamps are kept (the objects are what a rebuild would reuse).
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    pip install ninja==1.13.2 || exit 1; \
    if command -v nvcc >/dev/null 2>&1; then \
        echo "chatglm-serve: $(nvcc --version | tail -n1): compiling the CUDA kernels for ${TORCH_CUDA_ARCH_LIST}"; \
        python -m chatglm_serve.kernels.build --cpu --cuda || exit 1; \
    else \
        echo "chatglm-serve: no nvcc in the builder image: CUDA kernels NOT compiled;" \
             "this image serves on CPU (with the prebuilt CPU kernels)"; \
        python -m chatglm_serve.kernels.build --cpu || exit 1; \
    fi \
    && find "${CHATGLM_SERVE_KERNEL_CACHE}" -name '*.o' -delete

# The embedded tiny demo model (served when CHATGLM_MODEL is unset), built once here.
RUN python -c 'from chatglm_serve.model.demo import demo_checkpoint_dir; print("demo model:", demo_checkpoint_dir())' \
    && cp -r /src/configs /opt/chatglm-serve/configs \
    && chmod -R a+rX,go-w /opt/chatglm-serve

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG UID=10001
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN useradd --system --uid "${UID}" --user-group --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin chatglm
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/chatglm-serve /opt/chatglm-serve
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CHATGLM_SERVE_CACHE=/opt/chatglm-serve/cache \
    CHATGLM_SERVE_KERNEL_CACHE=/opt/chatglm-serve/kernels \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    HOME=/tmp \
    CHATGLM_HOST=0.0.0.0 \
    CHATGLM_PORT=8000
WORKDIR /tmp
USER ${UID}:${UID}
EXPOSE 8000
# /health answers 503 until the model is loaded; a 6B checkpoint may take minutes to load.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('CHATGLM_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["chatglm-serve"]
