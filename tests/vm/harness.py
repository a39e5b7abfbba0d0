"""Boot Debian's kernel under qemu-system-x86_64 (TCG) with a tiny initramfs
that attaches an NBD export with the kernel's own nbd-client.

Everything comes from Debian packages: the kernel package that
linux-image-amd64 depends on and busybox-static are fetched with
`apt-get download` and unpacked with `dpkg -x` into a cache directory;
nbd-client and its shared libraries are copied from the host. The guest is
networked only through qemu user networking with restrict=on and one
guestfwd to 127.0.0.1 (one socat per guest connection).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("NBDLUKS_VM_CACHE", "/var/tmp/nbdluks-vm-cache"))
GUEST_ADDR = "10.0.2.100"
GUEST_PORT = 10809
MODULES = ("nbd", "e1000", "virtio_pci", "virtio_blk", "crc32c_generic", "ext4")


class VmUnavailable(Exception):
    """Something the VM needs cannot be had here (a reason to skip locally)."""


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0:
        raise VmUnavailable(f"{' '.join(cmd)} failed: {p.stderr.strip()[-500:]}")
    return p.stdout


def fetch_debs() -> Path:
    """Kernel and busybox-static unpacked under CACHE/root (done once)."""
    root = CACHE / "root"
    if (CACHE / "ready").exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    debs = CACHE / "debs"
    debs.mkdir(exist_ok=True)
    os.chmod(debs, 0o777)  # apt-get download drops privileges to _apt
    for attempt in range(2):
        try:
            deps = _run(["apt-cache", "depends", "linux-image-amd64"])
            m = re.search(r"Depends: (linux-image-[\w.+-]+)", deps)
            if not m:
                raise VmUnavailable("cannot find the kernel package linux-image-amd64 needs")
            _run(["apt-get", "download", m.group(1), "busybox-static"], cwd=debs)
            break
        except VmUnavailable:
            if attempt or os.geteuid() != 0:
                raise
            _run(["apt-get", "update", "-qq"])  # empty or stale package lists
    for deb in debs.glob("*.deb"):
        _run(["dpkg", "-x", str(deb), str(root)])
    (CACHE / "ready").touch()
    return root


def kernel_files(root: Path) -> tuple[Path, Path]:
    vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise VmUnavailable("no vmlinuz in the kernel package")
    version = vmlinuz[-1].name.removeprefix("vmlinuz-")
    return vmlinuz[-1], root / "lib" / "modules" / version / "kernel"


def _modinfo_depends(ko: Path) -> list[str]:
    data = ko.read_bytes()
    m = re.search(rb"\0depends=([^\0]*)\0", data)
    if not m or not m.group(1):
        return []
    return m.group(1).decode().split(",")


def module_order(moddir: Path, wanted: tuple[str, ...]) -> list[Path]:
    """The .ko files to insmod, dependencies first (no depmod needed)."""
    index = {p.name.removesuffix(".ko").replace("-", "_"): p for p in moddir.rglob("*.ko")}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        ko = index.get(name)
        if ko is None:  # built into the kernel
            return
        for dep in _modinfo_depends(ko):
            visit(dep)
        order.append(ko)

    for w in wanted:
        visit(w)
    return order


def _libs(binary: str) -> list[Path]:
    out = _run(["ldd", binary])
    libs = []
    for line in out.splitlines():
        m = re.search(r"(/\S+\.so[^\s]*)", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def ext2_image(tmp: Path, size_kib: int = 4096) -> bytes:
    """An empty ext2 file system made on the host (Debian's busybox has no mkfs)."""
    img = tmp / "fs.img"
    with open(img, "wb") as f:
        f.truncate(size_kib * 1024)
    _run(["mke2fs", "-q", "-t", "ext2", "-b", "4096", "-F", str(img)])
    return img.read_bytes()


def _cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 1) -> bytes:
    nm = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nm), 0]
    hdr = b"070701" + b"".join(f"{f:08x}".encode() for f in fields)
    out = hdr + nm
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def build_initramfs(dest: Path, init_script: str, extra: dict[str, bytes] | None = None) -> None:
    """A newc cpio with busybox, nbd-client (+ libraries), modules and /init."""
    root = fetch_debs()
    _, moddir = kernel_files(root)
    files: dict[str, tuple[int, bytes]] = {}
    dirs = {"bin", "sbin", "dev", "proc", "sys", "tmp", "mnt", "lib", "lib64", "modules",
            "usr", "usr/lib", "lib/x86_64-linux-gnu", "etc"}
    busybox = root / "bin" / "busybox"
    files["bin/busybox"] = (0o100755, busybox.read_bytes())
    nbd_client = shutil.which("nbd-client") or "/usr/sbin/nbd-client"
    if not os.path.exists(nbd_client):
        raise VmUnavailable("nbd-client is not installed")
    files["sbin/nbd-client"] = (0o100755, Path(nbd_client).read_bytes())
    for lib in _libs(nbd_client):
        real = lib.resolve()
        rel = str(lib).lstrip("/")
        dirs.add(os.path.dirname(rel))
        files[rel] = (0o100755, real.read_bytes())
    for i, ko in enumerate(module_order(moddir, MODULES)):
        files[f"modules/{i:02d}-{ko.name}"] = (0o100644, ko.read_bytes())
    files["init"] = (0o100755, init_script.encode())
    for name, data in (extra or {}).items():
        files[name] = (0o100644, data)
    out = bytearray()
    ino = 1
    for d in sorted(dirs):
        out += _cpio_entry(d, stat.S_IFDIR | 0o755, ino=ino)
        ino += 1
    for name, (mode, data) in sorted(files.items()):
        out += _cpio_entry(name, mode, data, ino=ino)
        ino += 1
    out += _cpio_entry("TRAILER!!!", 0, ino=0)
    dest.write_bytes(bytes(out))


INIT_PRELUDE = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in /modules/*.ko; do insmod "$m" || echo "RESULT insmod-failed $m"; done
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
echo "RESULT booted"
"""

INIT_END = r"""
sync
echo "RESULT done"
poweroff -f
"""


@dataclass
class VmResult:
    results: list[tuple[str, ...]]
    console: str

    def get(self, key: str) -> tuple[str, ...]:
        for r in self.results:
            if r[0] == key:
                return r[1:]
        raise AssertionError(f"no RESULT {key} in the console output:\n{self.console[-4000:]}")


def boot(tmp: Path, script: str, *, port: int, drive_uri: str | None = None,
         extra: dict[str, bytes] | None = None, timeout: float = 400) -> VmResult:
    """Boot the guest running `script` (busybox sh) and collect RESULT lines."""
    if not shutil.which("qemu-system-x86_64"):
        raise VmUnavailable("qemu-system-x86_64 is not installed")
    if not shutil.which("socat"):
        raise VmUnavailable("socat is not installed")
    root = fetch_debs()
    vmlinuz, _ = kernel_files(root)
    initrd = tmp / "initramfs.cpio"
    build_initramfs(initrd, INIT_PRELUDE + script + INIT_END, extra)
    fwd = (f"guestfwd=tcp:{GUEST_ADDR}:{GUEST_PORT}-cmd:socat STDIO TCP:127.0.0.1:{port}")
    cmd = [
        "qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-smp", "2", "-nographic",
        "-no-reboot", "-kernel", str(vmlinuz), "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 quiet loglevel=3",
        "-netdev", f"user,id=n0,restrict=on,{fwd}", "-device", "e1000,netdev=n0",
    ]
    if drive_uri:
        cmd += ["-drive", f"file={drive_uri},format=raw,if=virtio,cache=none"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        console = p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise AssertionError(f"the VM did not finish in {timeout} s:\n{out[-4000:]}") from None
    # a line may start with terminal escapes the console emitted
    results = [tuple(m.group(1).split()) for m in re.finditer(r"RESULT (.*)", console)]
    return VmResult(results, console)
