# nbdluks: serve the decrypted contents of a LUKS volume over NBD.
#
# Two stages: the builder makes a virtualenv with the pinned dependencies
# (deploy/constraints.txt, from scripts/lock), builds the wheel and installs
# it; the runtime stage gets only that virtualenv. No compiler reaches the
# image.
FROM python:3.11-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A compiler for the C helpers (nbdluks/luks/_xtsloop.c, nbdluks/nbd/_transmit.c); it stays in this
# stage. (Python's headers come with the python image; a Debian python needs
# python3-dev.)
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
        $(python3 -c 'import os, sysconfig; h = sysconfig.get_paths()["include"]; \
                      print("" if os.path.exists(h + "/Python.h") else "python3-dev")') \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/nbdluks
# Dependencies first: this layer is rebuilt only when the pins change.
COPY deploy/constraints.txt /tmp/constraints.txt
RUN /opt/nbdluks/bin/pip install -r /tmp/constraints.txt
COPY pyproject.toml setup.py README.md /src/
COPY nbdluks /src/nbdluks
# The image runs the wheel users install: built here (the dependencies are
# in the venv already, so no isolated build environment), then installed;
# its data files put the man pages in /opt/nbdluks/share/man.
RUN /opt/nbdluks/bin/pip install 'setuptools>=77' \
    && /opt/nbdluks/bin/pip wheel --no-deps --no-build-isolation -w /dist /src \
    && /opt/nbdluks/bin/pip install --no-deps /dist/nbdluks-*.whl \
    && /opt/nbdluks/bin/python -c "import nbdluks.luks._xtsloop, nbdluks.nbd._transmit" \
    && test -f /opt/nbdluks/share/man/man1/nbdluks-serve.1 \
    && /opt/nbdluks/bin/pip uninstall -y setuptools pip \
    && find /opt/nbdluks -name __pycache__ -prune -exec rm -rf {} +

FROM python:3.11-slim-bookworm
COPY --from=builder /opt/nbdluks /opt/nbdluks
# A fixed uid: Kubernetes' runAsUser/fsGroup and compose's --user name it.
RUN groupadd --system --gid 10809 nbdluks \
    && useradd --system --uid 10809 --gid 10809 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin nbdluks
ENV PATH=/opt/nbdluks/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    MANPATH=/opt/nbdluks/share/man:
# Non-root by default. To read files only root may read (a root-owned 0600
# passphrase), start as root with `--user nbdluks` in the command: nbdluks
# opens everything, then drops to uid 10809 before serving (as compose does).
USER 10809:10809
EXPOSE 10809
# A real NBD handshake and export info: the server answers, not just the port.
# (With --tls require, override it with an nbds:// URI and client certificates.)
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=3 \
    CMD ["nbdluks", "probe", "--timeout", "4", "nbd://127.0.0.1:10809/"]
# PID 1 is nbdluks itself: it handles SIGTERM (drain, flush, exit 0) and
# reaps every child; it starts no other program. (An init such as tini, or
# compose's `init: true`, could not signal it once it has switched users.)
STOPSIGNAL SIGTERM
ENTRYPOINT ["nbdluks"]
# Bound to all addresses inside the container: publish it on 127.0.0.1 only
# (as docker-compose.yml does), or serve with --tls require.
CMD ["serve", "--payload", "/data/payload.img", "--header", "/data/header.img", \
     "--passphrase-file", "/run/secrets/luks_passphrase", "-b", "0.0.0.0", "-p", "10809", \
     "--log-format", "json"]
