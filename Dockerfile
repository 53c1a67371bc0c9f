# casepackets API image. Build: docker build -t casepackets .
# Runtime configuration comes from the environment (see README "Configuration"); nothing secret is
# baked in. The keyring lives on the /data volume (create it once: `casepackets keys init`).
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, from pyproject.toml and constraints.txt alone (the versions the test suite
# last passed on), so a code change does not reinstall them; then the project without dependencies.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY README.md ./
COPY service ./service
COPY alembic ./alembic
COPY policies ./policies
RUN pip install --no-deps .

RUN groupadd --system casepackets \
    && useradd --system --gid casepackets --home-dir /data --no-create-home casepackets \
    && mkdir -p /data \
    && chown casepackets:casepackets /data

ENV CASEPACKETS_ENV=production \
    CASEPACKETS_DEV_ISSUER=false \
    CASEPACKETS_HOME=/data \
    CASEPACKETS_POLICIES_DIR=/app/policies \
    CASEPACKETS_MIGRATIONS_DIR=/app/alembic \
    PORT=8000 \
    WORKERS=2

USER casepackets
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('PORT', '8000')}/healthz\", timeout=4)"]

# `serve` checks the settings, policies and keyring (a missing one is a one-line refusal, exit 2,
# not a traceback from every worker uvicorn restarts), migrates (idempotent; replicas starting
# together wait for each other), then runs uvicorn on PORT with WORKERS workers; uvicorn trusts
# X-Forwarded-* headers from FORWARDED_ALLOW_IPS.
CMD ["sh", "-c", "exec casepackets serve --host 0.0.0.0 --no-print-tokens --workers \"$WORKERS\""]
