# One slim image for every tokensend service; the command picks the service.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml ./
COPY protos ./protos
COPY scripts/gen-stubs.sh ./scripts/
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir grpcio-tools \
 && mkdir -p libs/stubs \
 && PY=/opt/venv/bin/python scripts/gen-stubs.sh
COPY libs ./libs
COPY services ./services
COPY sandbox ./sandbox
COPY cli ./cli
RUN /opt/venv/bin/pip install --no-cache-dir . \
 && /opt/venv/bin/pip uninstall -y grpcio-tools \
 && echo /app/libs/stubs > "$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/tokensend-stubs.pth"

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /app tokensend
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY --from=build /src/libs ./libs
COPY --from=build /src/services ./services
COPY --from=build /src/sandbox ./sandbox
COPY --from=build /src/cli ./cli
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
USER tokensend
EXPOSE 50051 50052 50053 8080
CMD ["python", "-m", "services.resolver"]
