# Tandem's images, one target each:
#
#   docker build --target proxy    -t tandem-proxy .     # the sidecar (also `inject`, `await`)
#   docker build --target init     -t tandem-init .      # the redirect rules, with iptables and nft
#   docker build --target identity -t tandem-identity .  # the issuer service and CA tools
#
# The runtime layers carry one binary each and no shell (except the init image,
# which needs the firewall tools). The proxy runs as uid 2102, the uid that
# tandem-init exempts from redirection; the issuer as 2103.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --profile production --locked -p tandem-proxy -p tandem-init -p tandem-identity --bins \
    && mkdir -p /out \
    && cp target/production/tandem-proxy target/production/tandem-init target/production/tandem-identity /out/

FROM debian:bookworm-slim AS init
# iptables brings both the nf_tables and the legacy backends; nftables brings nft.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables nftables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/tandem-init /usr/local/bin/tandem-init
# Runs as root only in its init container, with NET_ADMIN and NET_RAW (see `inject`).
ENTRYPOINT ["/usr/local/bin/tandem-init"]

FROM gcr.io/distroless/cc-debian12:nonroot AS identity
COPY --from=build /out/tandem-identity /usr/local/bin/tandem-identity
USER 2103:2103
ENTRYPOINT ["/usr/local/bin/tandem-identity"]

# Last, so that a plain `docker build .` gives the proxy.
FROM gcr.io/distroless/cc-debian12:nonroot AS proxy
COPY --from=build /out/tandem-proxy /usr/local/bin/tandem-proxy
USER 2102:2102
EXPOSE 4140 4143 4191
ENTRYPOINT ["/usr/local/bin/tandem-proxy"]
