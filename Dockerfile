# syntax=docker/dockerfile:1
# The Portcullis image: a release build of the `portcullis` binary on a distroless runtime.
#
#   docker build -t portcullis:0.1.0 .
#   # sidecar (the default command), on loopback in the network namespace of container APP:
#   docker run --network container:APP -e API_BASE_URL=https://NAME.openai.azure.com \
#     -e AZURE_TENANT_ID=... -e AZURE_CLIENT_ID=... -e AZURE_CERTIFICATE_PATH=/certs/gateway.pem \
#     -v "$PWD/certs:/certs:ro" --read-only portcullis:0.1.0
#   # the full gateway:
#   docker run -p 8080:8080 -v "$PWD/config:/etc/portcullis:ro" --read-only portcullis:0.1.0 \
#     serve --config /etc/portcullis/portcullis.toml
#
# Runs as uid/gid 65532 and writes nothing by itself, so it runs with a read-only root
# filesystem. The one writable place it offers is /var/lib/portcullis (the working
# directory, owned by 65532), for what a configuration asks to keep on disk: a SQLite
# store (`[store] url = "sqlite:///var/lib/portcullis/portcullis.db"`) or an audit file.
# Mount a volume there when you use it; PostgreSQL and audit lines on stdout need none.
# (`serve`'s default store is SQLite beside the configuration file: with a read-only
# configuration mount, set [store] url.)
# tests/deploy.rs checks this file against Cargo.toml and the toolchain.

# The toolchain the project is built and tested with (`rustc --version`); Debian 12 like
# the runtime image, so the binary finds the same glibc.
ARG RUST_VERSION=1.95
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin portcullis \
 && mkdir -p /out/var/lib/portcullis

# libc and libgcc_s only (TLS is rustls with aws-lc, built in): distroless `cc`.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="portcullis" \
      org.opencontainers.image.description="Identity-aware gateway for Azure OpenAI and OpenAI-compatible APIs" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build --chown=65532:65532 /out/var/lib/portcullis /var/lib/portcullis
COPY --from=build /src/target/release/portcullis /usr/local/bin/portcullis
USER 65532:65532
WORKDIR /var/lib/portcullis
EXPOSE 8080
# `portcullis healthcheck` asks http://127.0.0.1:${PORT:-8080}/health (sidecar mode, or a
# gateway whose [server] listen is on 8080; otherwise override with `--url`).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/portcullis", "healthcheck"]
# SIGTERM drains in-flight requests and streams ([server] drain_timeout in serve mode).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/portcullis"]
CMD ["sidecar"]
