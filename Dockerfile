# The failover orchestration service: one image for `serve`, `db upgrade`, `emulate` and `demo`.
#
#   docker build -t failover-orchestrator .
#   docker run --rm failover-orchestrator --help
#
# The build stage installs the project (`pip install .`) into a virtual environment that the
# runtime stage copies, so neither pip's cache nor the sources end up in the final image.

FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Only what the package needs: the top-level packages listed in pyproject.toml.
COPY pyproject.toml ./
COPY statemachine/ statemachine/
COPY consumers/ consumers/
COPY publishers/ publishers/
COPY schemas/ schemas/
COPY adapters/ adapters/
COPY emulators/ emulators/
COPY failover/ failover/
RUN pip install .


FROM python:3.11-slim

LABEL org.opencontainers.image.title="failover-orchestrator" \
      org.opencontainers.image.description="Event-driven failover orchestration for VMware-to-CloudStack migrations"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    FAILOVER_METRICS_PORT=9108

RUN groupadd --system --gid 10001 failover \
 && useradd --system --uid 10001 --gid failover --home-dir /home/failover --create-home \
        --shell /usr/sbin/nologin failover

COPY --from=build /opt/venv /opt/venv

USER 10001:10001
WORKDIR /home/failover

# /metrics, /healthz and /readyz (FAILOVER_METRICS_PORT).
EXPOSE 9108

# Liveness only: readiness (/readyz) depends on the broker and the database, and a container
# that is restarted for their outage would not bring them back.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FAILOVER_METRICS_PORT', '9108'), timeout=4)"]

ENTRYPOINT ["failoverctl"]
CMD ["serve"]
