# The sidecar variant's init container: nftables and nothing else.
#   docker build -f docker/k8s/sidecar/netinit.Dockerfile -t egress-guard-netinit:0.1.0 .
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables \
 && rm -rf /var/lib/apt/lists/*
ENTRYPOINT ["nft"]
