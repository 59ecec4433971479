FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY sdk ./sdk
COPY server ./server
RUN pip install --no-cache-dir . && useradd --create-home broker && mkdir /data && chown broker /data

USER broker
VOLUME ["/data"]
EXPOSE 50051 9464
# Reachable from other machines, so every call needs an API key: make the
# first admin key on the volume before the first start (README, "API keys").
ENV BROKER_HOST=0.0.0.0 \
    BROKER_PORT=50051 \
    BROKER_DATABASE=/data/jobbroker.db \
    BROKER_METRICS_PORT=9464 \
    BROKER_AUTH=true
# Health needs no key; over TLS, set BROKER_TLS=true and BROKER_TLS_CA for it.
HEALTHCHECK CMD broker health --timeout 2
ENTRYPOINT ["broker"]
CMD ["serve"]
