# The project's processes (stream worker, trainer, scorer, simulator) in one image; docker-compose.yml
# runs each as its own service against the compose Kafka and Redis.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ZENITH_HOME=/data

WORKDIR /app
# Dependencies first, from pyproject.toml alone: that heavy layer (torch) stays cached while code changes.
# confluent-kafka's wheel bundles librdkafka, so no system packages are needed.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

COPY README.md ./
COPY stream ./stream
COPY model ./model
COPY state ./state
COPY deploy ./deploy
RUN pip install --no-deps . \
    && useradd --create-home --uid 10001 zenith \
    && mkdir -p /data && chown zenith /data

USER zenith
VOLUME ["/data"]
# Prometheus metrics: stream worker 9101, trainer 9102; ranking API (and its /metrics) 8080.
EXPOSE 9101 9102 8080
ENTRYPOINT ["zenith"]
CMD ["--help"]
