# Worker / Dagster user-code image for miroir-pipeline (what k8s/ deploys).
# Build: docker build -t miroir-pipeline:0.1.0 .
#
# The package is installed from its wheel, like any library: migrations, named SQL and the local
# Dagster instance template ship inside it (no MIROIR_MIGRATIONS_DIR, no repo-root dagster.yaml).
# In k8s the Dagster instance config is mounted into DAGSTER_HOME (k8s/worker-config.yaml, or the
# Helm chart's instance ConfigMap); dagster.prod.yaml is the same config for other deployments.

FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY miroir_pipeline ./miroir_pipeline
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    DAGSTER_HOME=/opt/dagster/home

# [k8s]: dagster-k8s, which the Helm chart's K8sRunLauncher needs in the user-code image.
COPY --from=wheel /dist /tmp/dist
RUN whl="$(ls /tmp/dist/miroir_pipeline-*.whl)" \
 && pip install --no-cache-dir "${whl}[k8s]" \
 && rm -rf /tmp/dist \
 && useradd --uid 10001 --create-home miroir \
 && mkdir -p "$DAGSTER_HOME" && chown -R miroir "$DAGSTER_HOME"

# The code location file the Dagster user-code server loads (k8s/dagster-values.yaml:
# `--python-file /app/definitions.py`); it imports the installed package.
WORKDIR /app
COPY definitions.py dagster.prod.yaml ./

USER 10001
EXPOSE 9108
ENTRYPOINT ["miroir-pipeline"]
CMD ["worker", "--metrics-port", "9108", "--metrics-addr", "0.0.0.0"]
