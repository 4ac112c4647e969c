# easel HTTP API (and webhook dispatcher). CPU only: the API never runs a pipeline.
# Build from the repository root:  docker build -f infra/docker/api.Dockerfile -t easel-api .
FROM python:3.12-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# The base install plus the api extra: no torch, no pipelines. More extras, e.g. tracing:
#   docker build --build-arg EXTRAS=api,tracing ...
ARG EXTRAS=api
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY worker ./worker
COPY producer ./producer
RUN pip install ".[${EXTRAS}]" && rm -rf /src

RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin easel
USER 10001:10001
WORKDIR /home/easel
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"
CMD ["easel", "api", "--host", "0.0.0.0", "--port", "8000"]
