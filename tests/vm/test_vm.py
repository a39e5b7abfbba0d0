"""A real kernel attaches nbdluks exports: nbd-client in a guest booted with
Debian's kernel, and qemu attaching the export as a virtio disk.

Run alone with `scripts/test -m vm` (needs qemu-system-x86, socat,
nbd-client and network access to Debian's package archive for the kernel).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import Upstream, need, pattern
from tests.luks.reference import fill, luks_format, read_plain
from tests.vm.harness import (
    GUEST_ADDR,
    GUEST_PORT,
    VmResult,
    VmUnavailable,
    boot,
    ext2_image,
)

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(900)]

MiB = 1 << 20
PATTERN_AT = 28 * MiB  # past the 16 MiB the filesystem test uses


def guest_pattern() -> bytes:
    """What `yes nbdluks-vm-pattern | head -c 1048576` writes in the guest."""
    line = b"nbdluks-vm-pattern\n"
    return (line * (MiB // len(line) + 1))[:MiB]


def attach(connections: int, block_size: int) -> str:
    return (f"nbd-client {GUEST_ADDR} {GUEST_PORT} /dev/nbd0 -N '' -C {connections} "
            f"-b {block_size} || echo 'RESULT attach-failed'\n")


CHECKS = r"""
echo "RESULT size $(blockdev --getsize64 /dev/nbd0)"
echo "RESULT sha256 $(sha256sum /dev/nbd0 | cut -d' ' -f1)"
yes nbdluks-vm-pattern | head -c 1048576 > /tmp/pat
dd if=/tmp/pat of=/dev/nbd0 bs=4096 seek=$((PATTERN_AT / 4096)) conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/nbd0 of=/tmp/back bs=4096 skip=$((PATTERN_AT / 4096)) count=256 2>/dev/null
echo "RESULT readback $(sha256sum /tmp/back | cut -d' ' -f1)"
echo "RESULT sha256-after $(sha256sum /dev/nbd0 | cut -d' ' -f1)"
"""

VIRTIO = r"""
echo "RESULT vda $(sha256sum /dev/vda | cut -d' ' -f1)"
"""

FILESYSTEM = attach(2, 4096) + r"""
dd if=/fs.img of=/dev/nbd0 bs=65536 conv=fsync 2>/dev/null || echo "RESULT mkfs-failed"
mount -t ext2 /dev/nbd0 /mnt || { echo "RESULT mount-failed"; dmesg | tail -5; }
echo "written by a guest kernel" > /mnt/hello.txt
umount /mnt
echo "RESULT gone-after-umount $(test -e /mnt/hello.txt && echo no || echo yes)"
nbd-client -d /dev/nbd0
sleep 1
""" + attach(2, 4096) + r"""
mount -t ext2 /dev/nbd0 /mnt || echo "RESULT remount-failed"
echo "RESULT fs $(cat /mnt/hello.txt | tr ' ' '_')"
umount /mnt
nbd-client -d /dev/nbd0
"""


def run_vm(tmp_path: Path, port: int, script: str, drive_uri: str | None = None,
           with_fs: bool = False, fs_kib: int = 4096) -> VmResult:
    try:
        extra = {"fs.img": ext2_image(tmp_path, fs_kib)} if with_fs else None
        return boot(tmp_path, script, port=port, drive_uri=drive_uri, extra=extra)
    except VmUnavailable as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))


def test_luks2_detached_from_upstreams_kernel_and_virtio(nbdluks, upstreams,
                                                         tmp_path: Path) -> None:
    need("cryptsetup", "nbdkit", "qemu-nbd", "qemu-system-x86_64", "socat")
    made = luks_format(tmp_path, pbkdf="argon2id", sector_size=4096, detached=True,
                       size=32 * MiB)
    assert made.header
    plain = pattern(32 * MiB, seed=77)
    fill(made, plain)
    (tmp_path / "pass.txt").write_bytes(made.passphrase)
    hdr = Upstream("nbdkit", made.header, tmp_path, tcp=False, read_only=True)
    pay = Upstream("qemu-nbd", made.payload, tmp_path, tcp=True)
    upstreams += [hdr, pay]
    srv = nbdluks("--header", hdr.uri, "--payload", pay.uri, "--passphrase-file",
                  str(tmp_path / "pass.txt"), tcp=True, unix=False)
    assert srv.port
    script = (f"PATTERN_AT={PATTERN_AT}\n" + attach(2, 512) + CHECKS + VIRTIO
              + "nbd-client -d /dev/nbd0\n" + FILESYSTEM)
    vm = run_vm(tmp_path, srv.port, script, drive_uri=srv.tcp_uri, with_fs=True)
    assert vm.get("booted") == ()
    assert not [r for r in vm.results if r[0].endswith("failed")], vm.console[-3000:]
    assert vm.get("size") == (str(32 * MiB),)
    assert vm.get("sha256") == (hashlib.sha256(plain).hexdigest(),)
    pat = guest_pattern()
    assert vm.get("readback") == (hashlib.sha256(pat).hexdigest(),)
    after = plain[:PATTERN_AT] + pat + plain[PATTERN_AT + MiB :]
    assert vm.get("sha256-after") == (hashlib.sha256(after).hexdigest(),)
    assert vm.get("vda") == vm.get("sha256-after")  # qemu's NBD client sees the same
    assert vm.get("gone-after-umount") == ("yes",)
    assert vm.get("fs") == ("written_by_a_guest_kernel",)
    assert vm.get("done") == ()
    assert srv.stop() == 0
    # the guest's write is in the payload, encrypted, where it belongs
    assert read_plain(made, MiB, at=PATTERN_AT) == pat
    tail = PATTERN_AT + MiB
    assert read_plain(made, MiB, at=tail) == plain[tail : tail + MiB]
    # two kernel connections, qemu's, and two more after the reconnect
    assert srv.log_text().count("export negotiated") >= 5


def test_luks1_attached_single_connection(nbdluks, tmp_path: Path) -> None:
    need("cryptsetup", "qemu-system-x86_64", "socat")
    made = luks_format(tmp_path, version=1, size=32 * MiB + 2 * MiB)
    size = 32 * MiB
    plain = pattern(size, seed=78)
    fill(made, plain)
    (tmp_path / "pass.txt").write_bytes(made.passphrase)
    srv = nbdluks("--payload", str(made.payload), "--passphrase-file",
                  str(tmp_path / "pass.txt"), tcp=True, unix=False)
    assert srv.port
    vm = run_vm(tmp_path, srv.port, f"PATTERN_AT={PATTERN_AT}\n" + attach(1, 512) + CHECKS
                + "nbd-client -d /dev/nbd0\n")
    assert not [r for r in vm.results if r[0].endswith("failed")], vm.console[-3000:]
    exported = made.payload.stat().st_size - made.offset
    assert vm.get("size") == (str(exported),)
    assert exported == size
    assert vm.get("sha256") == (hashlib.sha256(plain).hexdigest(),)
    pat = guest_pattern()
    assert vm.get("readback") == (hashlib.sha256(pat).hexdigest(),)
    assert srv.stop() == 0
    assert read_plain(made, MiB, at=PATTERN_AT) == pat


ROTATION_FILES = 12
ROTATION = attach(2, 4096) + r"""
dd if=/fs.img of=/dev/nbd0 bs=65536 conv=fsync 2>/dev/null || echo "RESULT mkfs-failed"
mount -t ext2 /dev/nbd0 /mnt || echo "RESULT mount-failed"
i=0
while [ $i -lt FILES ]; do
  yes "rotation-file-$i" | head -c 524288 > /mnt/f$i
  sync
  sleep 1
  i=$((i + 1))
done
echo 3 > /proc/sys/vm/drop_caches
i=0
while [ $i -lt FILES ]; do
  echo "RESULT f$i $(sha256sum /mnt/f$i | cut -d' ' -f1)"
  i=$((i + 1))
done
umount /mnt || echo "RESULT umount-failed"
nbd-client -d /dev/nbd0
""".replace("FILES", str(ROTATION_FILES))


def _file(i: int) -> bytes:
    line = f"rotation-file-{i}\n".encode()
    return (line * (524288 // len(line) + 1))[:524288]


def test_a_mounted_filesystem_through_an_online_key_rotation(nbdluks, tmp_path: Path) -> None:
    """The guest kernel writes files on ext2 while the server rotates the
    volume key at 1 MiB/s under it; afterwards e2fsck finds the file system
    clean and every file whole, read with the new key only."""
    import subprocess

    from tests.conftest import run
    from tests.manage.test_reencrypt import final_plaintext

    need("cryptsetup", "qemu-system-x86_64", "socat", "e2fsck", "debugfs")
    size = 24 * MiB
    made = luks_format(tmp_path, size=16 * MiB + size)
    fill(made, pattern(size, seed=79))
    srv = nbdluks("--payload", str(made.payload), "--key-file",
                  str(made.payload.with_suffix(".pass")), "--reencrypt", "--reencrypt-rate",
                  "1", "--hotzone-size", "1M", tcp=True, unix=False)
    assert srv.port
    vm = run_vm(tmp_path, srv.port, ROTATION, with_fs=True, fs_kib=size // 1024)
    assert not [r for r in vm.results if r[0].endswith("failed")], vm.console[-3000:]
    for i in range(ROTATION_FILES):
        assert vm.get(f"f{i}") == (hashlib.sha256(_file(i)).hexdigest(),)
    assert srv.stop() == 0
    steps = srv.log_text().count("reencryption step done")
    assert steps >= 4, "the key was not being rotated while the guest worked"
    if "online-reencrypt" in run(["cryptsetup", "luksDump", str(made.payload)]).stdout:
        subprocess.run([sys.executable, "-m", "nbdluks", "reencrypt", "--resume-only",
                        "--payload", str(made.payload), "--key-file",
                        str(made.payload.with_suffix(".pass"))], check=True,
                       capture_output=True)
    key, plain = final_plaintext(made, size)
    assert key != made.key
    img = tmp_path / "after.img"
    img.write_bytes(plain)
    fsck = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    for i in range(ROTATION_FILES):
        got = subprocess.run(["debugfs", "-R", f"cat /f{i}", str(img)], capture_output=True)
        assert got.stdout == _file(i)
