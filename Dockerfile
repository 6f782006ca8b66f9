# SAGE knowledge server: `docker build -t sage-kb . && docker run -p 8000:8000 sage-kb`
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SAGE_DB_PATH=/data/sage.db \
    SAGE_CACHE_DIR=/data/cache \
    SAGE_BACKUP_DIR=/data/backups \
    SAGE_HOST=0.0.0.0 \
    MALLOC_ARENA_MAX=2

WORKDIR /app
COPY pyproject.toml README.md ./
COPY sage_server ./sage_server
COPY knowledge ./knowledge
COPY migrations ./migrations
# A non-editable install: the bundled knowledge/ and migrations/ travel inside the wheel.
RUN pip install . && rm -rf /app/build

# Run as an unprivileged user; the knowledge base and caches live on a volume.
RUN useradd --create-home --uid 10001 sage && mkdir -p /data && chown sage:sage /data
USER sage
VOLUME ["/data"]
WORKDIR /data

# Beyond loopback with no SAGE_API_KEY, the first start generates an admin key in /data/admin.key and prints it once
# (`docker logs`); SAGE_ALLOW_ANONYMOUS=true serves without one. Metrics (9000) carry no credential check, so they
# listen inside the container only unless SAGE_METRICS_HOST=0.0.0.0 is set.
EXPOSE 8000 8001 9000
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status == 200 else 1)"]

CMD ["sage", "serve", "--host", "0.0.0.0", "--port", "8000"]
