# syntax=docker/dockerfile:1
# gorp in a container: gorp and gorp-script-agent built from this tree, on Debian 12 (bookworm)
# with Node 22 and Claude Code's ACP agent (the versions gorp's tests run against).
#
#   docker build -t gorp .
#   docker run -d --name gorp --stop-timeout 240 \
#     -v gorp-data:/data -v gorp-workspaces:/workspaces -p 127.0.0.1:13000:13000 \
#     -e GORP_WEBHOOK_TOKENS=... -e ANTHROPIC_API_KEY=... gorp
#
# docs/deploy.md has the details (volumes, configuration, secrets, backups, upgrades).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# --- gorp -------------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
# SQL is checked against the query data committed in .sqlx/: no database needed to build.
ENV SQLX_OFFLINE=true CARGO_TERM_COLOR=never
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin gorp --bin gorp-script-agent \
 && install -D -m 0755 target/release/gorp target/release/gorp-script-agent -t /out/ \
 && /out/gorp --version

# --- Node 22 and the Claude agent -------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS node
# Node 22 LTS, the version scripts/setup-claude-agent installs for the tests.
ARG NODE_VERSION=22.23.3
# @agentclientprotocol/claude-agent-acp: the version gorp is tested with (scripts/setup-claude-agent).
ARG CLAUDE_AGENT_VERSION=0.101.0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Debian's current packages of the release (security fixes included), not pinned versions.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl xz-utils \
 && rm -rf /var/lib/apt/lists/*
# The official binary tarball, checked against the release's SHASUMS256.txt.
WORKDIR /tmp
RUN set -eux; \
    case "$(dpkg --print-architecture)" in \
      amd64) arch=x64 ;; arm64) arch=arm64 ;; \
      *) echo "no Node build for $(dpkg --print-architecture)" >&2; exit 1 ;; \
    esac; \
    tarball="node-v${NODE_VERSION}-linux-${arch}.tar.xz"; \
    curl -fsSLO "https://nodejs.org/dist/v${NODE_VERSION}/${tarball}"; \
    curl -fsSLO "https://nodejs.org/dist/v${NODE_VERSION}/SHASUMS256.txt"; \
    grep " ${tarball}\$" SHASUMS256.txt | sha256sum -c -; \
    mkdir -p /opt/node; \
    tar -xJf "${tarball}" -C /opt/node --strip-components=1 --no-same-owner; \
    rm -f "${tarball}" SHASUMS256.txt; \
    /opt/node/bin/node --version
ENV PATH=/opt/node/bin:$PATH
RUN npm install -g --no-audit --no-fund --loglevel=error \
      "@agentclientprotocol/claude-agent-acp@${CLAUDE_AGENT_VERSION}" \
 && npm cache clean --force \
 && test -x /opt/node/bin/claude-agent-acp

# --- runtime ----------------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim
# tini: PID 1 that forwards SIGTERM to gorp alone (gorp stops its agents itself) and reaps
# orphaned agent processes. sqlite3: backups (`docker exec gorp sqlite3 ...`). git and
# ca-certificates: what coding agents use. curl: the health check.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl git sqlite3 tini \
 && rm -rf /var/lib/apt/lists/*
COPY --from=node /opt/node /opt/node
COPY --from=build /out/gorp /out/gorp-script-agent /usr/local/bin/
COPY deploy/container.toml /etc/gorp/config.toml
# A fixed, non-root uid; its home is the data volume (an agent run without the sandbox keeps its
# ~/.claude there).
RUN groupadd --system --gid 10001 gorp \
 && useradd --system --uid 10001 --gid gorp --home-dir /data --shell /usr/sbin/nologin gorp \
 && install -d -o gorp -g gorp -m 0750 /data /workspaces
# NO_COLOR: plain log lines from gorp and from the agents, which inherit it.
ENV PATH=/opt/node/bin:$PATH \
    GORP_CONFIG_PATH=/etc/gorp/config.toml \
    NO_COLOR=1
USER 10001:10001
WORKDIR /data
VOLUME ["/data", "/workspaces"]
EXPOSE 13000
# gorp handles SIGTERM: running jobs get [worker] shutdown_grace_secs, then are released to the
# queue. `docker stop` waits only 10 s by default: run with --stop-timeout 240 (compose:
# stop_grace_period: 240s).
STOPSIGNAL SIGTERM
# /readyz: the database takes a write and its migrations are current.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["sh", "-c", "curl -fsS -o /dev/null http://127.0.0.1:${GORP_WEBHOOK_PORT:-13000}/readyz || exit 1"]
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/gorp"]
CMD ["start"]
