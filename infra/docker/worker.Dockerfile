# easel GPU worker: one `easel worker` launcher, one process per GPU it is given.
# Build from the repository root:  docker build -f infra/docker/worker.Dockerfile -t easel-worker .
ARG CUDA_IMAGE=nvidia/cuda:13.1.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# torch first, from the CUDA index matching the base image; a range in pyproject.toml that
# this version satisfies then installs nothing more.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
# easel's extras: add tracing with --build-arg EXTRAS=worker,tracing
ARG EXTRAS=worker

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/easel \
    PATH=/opt/easel/bin:$PATH \
    HF_HOME=/models/hf \
    EASEL_MODEL_ROOT=/models/easel \
    EASEL_METRICS_PORT=9100

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/easel \
 && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY worker ./worker
COPY producer ./producer
RUN pip install ".[${EXTRAS}]" && rm -rf /src

# Non-root; the model cache is a volume so weights are downloaded once per node, not per start.
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin easel \
 && mkdir -p /models/hf /models/easel && chown -R easel:easel /models
VOLUME ["/models"]
USER 10001:10001
WORKDIR /home/easel
EXPOSE 9100

# SIGTERM = warm shutdown: the running stage finishes, then the process exits. Give the
# container a stop grace period longer than the longest stage (docs/operations.md).
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "easel", "worker"]
CMD ["--family", "sd15", "--gpus", "0"]
