# syntax=docker/dockerfile:1
# clrsearch images, one file, three targets (docs/deployment.md):
#   server      the API server and `clrsearch db upgrade`; CPU PyTorch only, because
#               Optuna's GP sampler runs on torch, but no CUDA libraries.
#   worker      a GPU worker: PyTorch from PyPI, which brings its CUDA libraries as
#               wheels; the host brings only the NVIDIA driver and container toolkit.
#   worker-cpu  a worker for machines without GPUs, on the server's CPU layers.
# docker compose builds them; by hand: docker build --target worker -t clrsearch-worker .

FROM python:3.11.13-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# A fixed uid, so that files on shared volumes keep one owner across images and hosts.
RUN groupadd --system --gid 10001 clrsearch \
    && useradd --system --uid 10001 --gid clrsearch --create-home \
        --home-dir /home/clrsearch --shell /usr/sbin/nologin clrsearch \
    && install -d -o clrsearch -g clrsearch \
        /var/lib/clrsearch/data /var/lib/clrsearch/checkpoints
WORKDIR /app

# The runtime requirements, pinned in pyproject.toml: the dependency layers below are
# rebuilt when they change, not at every source edit.
FROM base AS requirements
COPY pyproject.toml ./
RUN python -c "import tomllib; \
        project = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
        print('\n'.join(project['dependencies']))" > requirements.txt \
    && grep -E '^(torch|torchvision)==' requirements.txt > torch.txt

FROM base AS cpu-dependencies
COPY --from=requirements /app/requirements.txt /app/torch.txt /tmp/
# torch and torchvision first, from PyTorch's CPU index (some 200 MB instead of the
# CUDA build's gigabytes); the rest from PyPI, where torch==X is then already met by
# the installed X+cpu.
RUN python -m venv /opt/venv \
    && pip install --index-url https://download.pytorch.org/whl/cpu -r /tmp/torch.txt \
    && pip install -r /tmp/requirements.txt

FROM base AS cuda-dependencies
COPY --from=requirements /app/requirements.txt /tmp/
RUN python -m venv /opt/venv \
    && pip install -r /tmp/requirements.txt

# The source stays in /app and is installed in editable mode: migrations find
# alembic.ini and alembic/ beside the packages, as in a checkout.
FROM base AS cpu-runtime
COPY --from=cpu-dependencies /opt/venv /opt/venv
COPY pyproject.toml README.md alembic.ini ./
COPY alembic ./alembic
COPY clrsearch ./clrsearch
COPY service ./service
COPY worker ./worker
COPY docker/healthcheck.py ./docker/
RUN pip install --no-deps -e .

FROM cpu-runtime AS server
# Inside a container the server listens on every interface; `clrsearch serve` then
# refuses to start unless CLRSEARCH_ADMIN_TOKEN and CLRSEARCH_WORKER_TOKEN are set.
ENV CLRSEARCH_HOST=0.0.0.0 \
    CLRSEARCH_PORT=8000
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "/app/docker/healthcheck.py", "server"]
ENTRYPOINT ["clrsearch"]
CMD ["serve"]

FROM cpu-runtime AS worker-cpu
ENV CLRSEARCH_DATA_DIR=/var/lib/clrsearch/data \
    CLRSEARCH_CHECKPOINT_DIR=/var/lib/clrsearch/checkpoints \
    CLRSEARCH_DEVICE=cpu
USER 10001:10001
# Unhealthy while the worker cannot reach its server, where all its work comes from.
HEALTHCHECK --interval=60s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "/app/docker/healthcheck.py", "worker"]
ENTRYPOINT ["clrsearch"]
CMD ["worker"]

FROM base AS worker
COPY --from=cuda-dependencies /opt/venv /opt/venv
COPY pyproject.toml README.md alembic.ini ./
COPY alembic ./alembic
COPY clrsearch ./clrsearch
COPY service ./service
COPY worker ./worker
COPY docker/healthcheck.py ./docker/
RUN pip install --no-deps -e .
ENV CLRSEARCH_DATA_DIR=/var/lib/clrsearch/data \
    CLRSEARCH_CHECKPOINT_DIR=/var/lib/clrsearch/checkpoints \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
HEALTHCHECK --interval=60s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "/app/docker/healthcheck.py", "worker"]
ENTRYPOINT ["clrsearch"]
# One worker process per GPU the container is given, each pinned to its own.
CMD ["worker", "--devices", "all"]
