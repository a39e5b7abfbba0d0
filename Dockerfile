# nbdluks: serve a decrypted LUKS volume over NBD, rootless.
FROM python:3.11-slim-bookworm

# cryptography and numpy come as wheels: no compiler, no system libraries.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY nbdluks ./nbdluks
RUN pip install --no-cache-dir . && rm -rf /src \
    && useradd --system --uid 10809 --no-create-home nbdluks

USER nbdluks
WORKDIR /
EXPOSE 10809
ENTRYPOINT ["nbdluks"]
# Secrets come from files (Docker secrets), never from the command line.
CMD ["serve", "--payload", "/data/payload.img", "--header", "/data/header.img", \
     "--passphrase-file", "/run/secrets/luks_passphrase", "-b", "0.0.0.0", "-p", "10809"]
