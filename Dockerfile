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
ENV BROKER_HOST=0.0.0.0 \
    BROKER_PORT=50051 \
    BROKER_DATABASE=/data/jobbroker.db \
    BROKER_METRICS_PORT=9464
HEALTHCHECK CMD python -c "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; s=g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')); sys.exit(s.Check(h.HealthCheckRequest(), timeout=2).status != 1)"
ENTRYPOINT ["broker"]
CMD ["serve"]
