# Stub until the Kubernetes deployment issue: builds the binaries and ships the proxy
# alone. The final image (separate proxy and init targets, firewall tools for
# tandem-init, a minimal runtime layer) is not done yet; see the README feature table.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bins

FROM debian:bookworm-slim AS proxy
COPY --from=build /src/target/release/tandem-proxy /usr/local/bin/tandem-proxy
USER 2102:2102
ENTRYPOINT ["/usr/local/bin/tandem-proxy"]
