# llmnode: one image per node. The default config serves the demo models (no GPU needed);
# mount your own at /etc/llmnode/config.yaml.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/llmnode/bin:$PATH

# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv tini ca-certificates \
 && rm -rf /var/lib/apt/lists/*

COPY setup.py setup.cfg README.rst /src/
COPY llmnode /src/llmnode
COPY twisted /src/twisted

# The host's CA bundle may be passed as a build secret (see shared CONTAINERS notes); nothing of
# it stays in the image. The plugin cache is built now: the non-root user cannot write it later.
RUN --mount=type=secret,id=build_ca \
    if [ -s /run/secrets/build_ca ]; then export PIP_CERT=/run/secrets/build_ca; fi \
 && python3 -m venv /opt/llmnode \
 && /opt/llmnode/bin/pip install --no-cache-dir /src \
 && /opt/llmnode/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 && rm -rf /src

COPY etc/config.example.yaml /etc/llmnode/config.yaml
RUN sed -i 's/^  host: "127.0.0.1".*/  host: "0.0.0.0"/' /etc/llmnode/config.yaml \
 && useradd --system --uid 10001 --home-dir /var/lib/llmnode --create-home llmnode \
 && mkdir -p /var/log/llmnode \
 && chown llmnode /var/log/llmnode

USER 10001
WORKDIR /var/lib/llmnode
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/api/health', timeout=2).status != 200)"]

ENTRYPOINT ["/usr/bin/tini", "--", "twistd", "-n", "--pidfile=", "llmnode"]
CMD ["--config", "/etc/llmnode/config.yaml", "--port", "8080", "--log-dir", "/var/log/llmnode"]
