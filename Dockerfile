# Worker / Dagster user-code image for miroir-pipeline (what k8s/ deploys).
# Build: docker build -t miroir-pipeline:0.1.0 .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    DAGSTER_HOME=/opt/dagster/home \
    MIROIR_MIGRATIONS_DIR=/app/migrations

WORKDIR /app
COPY pyproject.toml README.md definitions.py dagster.yaml dagster.prod.yaml ./
COPY miroir_pipeline ./miroir_pipeline
COPY migrations ./migrations
RUN pip install --no-cache-dir . \
 && useradd --uid 10001 --create-home miroir \
 && mkdir -p "$DAGSTER_HOME" && chown -R miroir "$DAGSTER_HOME"

USER 10001
EXPOSE 9108
ENTRYPOINT ["miroir-pipeline"]
CMD ["worker", "--metrics-port", "9108", "--metrics-addr", "0.0.0.0"]
