# nbdkit and the libnbd tools from Debian: the header and payload stores,
# and a client, of the two-store stack (stores.yml).
FROM debian:bookworm-slim
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        nbdkit libnbd-bin \
    && rm -rf /var/lib/apt/lists/*
