# One image for the three Headwater services. compose/docker-compose.yml picks
# the console script per service (headwater-ingest, headwater-processor,
# headwater-metrics); run alone, the image starts ingest.

FROM python:3.11-slim AS build
# A compiler for the dependencies that may build from source (cassandra-driver's
# C extensions); it stays in this stage and never reaches the runtime image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies first, from pyproject.toml alone, so a code change reuses this layer.
COPY pyproject.toml ./
RUN mkdir services && touch services/__init__.py \
 && pip install . \
 && pip uninstall -y headwater \
 && rm -rf build services *.egg-info
COPY services ./services
RUN pip install --no-deps .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/headwater headwater \
 && mkdir -p /var/lib/headwater/spool /etc/headwater \
 && chown -R headwater /var/lib/headwater
COPY --from=build /opt/venv /opt/venv
# A default registry so the image runs on its own; compose mounts config/sources.json over it.
COPY config/sources.json /etc/headwater/sources.json
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER headwater
WORKDIR /var/lib/headwater
EXPOSE 8080
# The slim image has no curl; Python's urllib raises on a non-2xx answer.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
CMD ["headwater-ingest"]
