# llmnode: one image per node. The default config serves the demo models (no GPU needed):
#     docker run -p 8080:8080 IMAGE
# Mount your own config at /etc/llmnode/config.yaml, and model weights and scripts beside it.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/llmnode/bin:$PATH

# python3 comes from apt, so that debian:bookworm-slim and a debootstrapped base behave the same.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv tini ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/llmnode --create-home llmnode \
 && mkdir -p /var/log/llmnode \
 && chown llmnode:llmnode /var/log/llmnode

# The host's CA bundle may be passed as a build secret (id=build_ca); nothing of it stays in the
# image. Dependencies first, read from setup.cfg, so that a code change reuses this layer.
COPY setup.cfg /src/
RUN --mount=type=secret,id=build_ca \
    if [ -s /run/secrets/build_ca ]; then export PIP_CERT=/run/secrets/build_ca; fi \
 && python3 -m venv /opt/llmnode \
 && python3 -c "import configparser; c = configparser.ConfigParser(); c.read('/src/setup.cfg'); print(c['options']['install_requires'].strip())" > /src/requirements.txt \
 && /opt/llmnode/bin/pip install --no-cache-dir -r /src/requirements.txt setuptools wheel

# The plugin cache is built now: the non-root user cannot write it later.
COPY setup.py README.rst /src/
COPY llmnode /src/llmnode
COPY twisted /src/twisted
RUN --mount=type=secret,id=build_ca \
    if [ -s /run/secrets/build_ca ]; then export PIP_CERT=/run/secrets/build_ca; fi \
 && /opt/llmnode/bin/pip install --no-cache-dir --no-deps --no-build-isolation /src \
 && /opt/llmnode/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 && /opt/llmnode/bin/twistd llmnode --help > /dev/null \
 && rm -rf /src

# The example config binds 127.0.0.1; a container must listen on every interface, and keep its
# logs and runtime state in folders the non-root user owns. /etc/llmnode/run is writable too, for
# a mounted config that leaves log_dir and runtime_dir relative to its folder. The edited config
# must pass `check --strict`: no unknown key, and every script's program is in the image.
COPY etc/config.example.yaml /etc/llmnode/config.yaml
RUN sed -i -e 's/^  host: "127.0.0.1".*/  host: "0.0.0.0"/' \
      -e 's|^  log_dir: .*|  log_dir: "/var/log/llmnode"\n  runtime_dir: "/var/lib/llmnode/run"|' \
      /etc/llmnode/config.yaml \
 && grep -q '^  host: "0.0.0.0"' /etc/llmnode/config.yaml \
 && grep -q '^  runtime_dir: "/var/lib/llmnode/run"' /etc/llmnode/config.yaml \
 && /opt/llmnode/bin/python -m llmnode check --strict /etc/llmnode/config.yaml \
 && install -d -o llmnode -g llmnode /etc/llmnode/run

USER 10001
WORKDIR /var/lib/llmnode
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/api/health', timeout=2).status != 200)"]

# tini is PID 1: it forwards SIGTERM to twistd and reaps orphans. No pidfile: a stale one would
# block a restarted container. --host 0.0.0.0 also covers a mounted config that binds 127.0.0.1.
ENTRYPOINT ["/usr/bin/tini", "--", "twistd", "-n", "--pidfile=", "llmnode"]
CMD ["--config", "/etc/llmnode/config.yaml", "--host", "0.0.0.0", "--port", "8080", "--log-dir", "/var/log/llmnode"]
