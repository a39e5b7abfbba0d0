# A Tang server (Debian's tangd behind socat), for the network-bound unlock
# demo (tang.yml). Its keys are a mounted directory (tangd-keygen DIR).
FROM debian:bookworm-slim
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tang socat \
    && rm -rf /var/lib/apt/lists/*
EXPOSE 80
CMD ["socat", "TCP-LISTEN:80,reuseaddr,fork", "EXEC:/usr/libexec/tangd /var/db/tang"]
