"""`header-backup` and `header-restore`: the same file as cryptsetup's
luksHeaderBackup (the header and every key slot area, rounded up to a page,
mode 0400, never over an existing file), and a restore that refuses a
backup whose layout differs from the volume's, or of another volume unless
forced. A backup also serves directly as a detached header."""

from __future__ import annotations

import os

from ..luks import DEFAULT_ARGON2_MAX_KIB, LuksError, Sync, Volume, Write
from ..nbd import UpstreamOptions
from ..unlock import open_source, read_header
from .store import HeaderStore, ManageError, reread
from .target import Target

PAGE = 4096
_LUKS1_KEYSLOTS_AT = 4096  # LUKS_ALIGN_KEYSLOTS


def _image(dev_read: bytes, vol: Volume) -> bytearray:
    size = vol.metadata_size
    image = bytearray(dev_read[:size])
    image += bytes(-(-size // PAGE) * PAGE - size)
    if vol.version == 1 and min((s.area_offset for s in vol.keyslots), default=PAGE) >= PAGE:
        image[592:_LUKS1_KEYSLOTS_AT] = bytes(_LUKS1_KEYSLOTS_AT - 592)  # no old signatures
    return image


def header_backup(target: Target, path: str) -> int:
    """Write the backup; its size."""
    with open_source(target.header, read_only=True, upstream=target.upstream) as dev:
        vol, _ = read_header(dev, target.argon2_max_kib)
        data = bytearray(vol.metadata_size)
        dev.pread_into(memoryview(data), 0)
    image = _image(bytes(data), vol)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400)
    except FileExistsError:
        raise ManageError(f"the backup file {path} already exists") from None
    except OSError as e:
        raise ManageError(f"cannot create the backup file {path!r}: {e.strerror}") from None
    try:
        view = memoryview(image)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(image)


def header_restore(target: Target, path: str, *, force: bool = False) -> Volume:
    """Put the backup's header (and key slot areas) back on the volume."""
    with open_source(path, read_only=True, upstream=UpstreamOptions()) as bdev:
        bvol, _ = read_header(bdev, DEFAULT_ARGON2_MAX_KIB)
        image = bytearray(bvol.metadata_size)
        bdev.pread_into(memoryview(image), 0)
    if bvol.json.get("config", {}).get("requirements", {}).get("mandatory"):
        raise ManageError(f"the backup {path} has mandatory requirements (an unfinished "
                          "reencryption?): not restored")
    with HeaderStore.open(target.header, target.upstream) as store:
        try:
            cur: Volume | None = store.read(target.argon2_max_kib)
        except LuksError as e:
            if not force:
                raise ManageError(f"{target.header} holds no valid LUKS header ({e}): "
                                  "restoring would overwrite whatever it holds (forcing "
                                  "it is possible)") from None
            cur = None
        if cur is not None:
            _compatible(cur, bvol, path, force)
        store.grow(len(image))
        store.apply([Write(0, image), Sync()], check=cur is not None)
        store.verify([Write(0, image)])
        return reread(store, target.argon2_max_kib)


def _compatible(cur: Volume, bvol: Volume, path: str, force: bool) -> None:
    if cur.version != bvol.version:
        if force:
            return  # as cryptsetup: another version's header has nothing to compare
        raise ManageError(f"the backup {path} is LUKS{bvol.version}, the volume LUKS"
                          f"{cur.version}: not restored (forcing it is possible)")
    if cur.segment.offset != bvol.segment.offset:
        raise ManageError(f"the data offset differs on the volume ({cur.segment.offset}) "
                          f"and in the backup ({bvol.segment.offset}): not restored")
    if cur.metadata_size != bvol.metadata_size or (
            cur.version == 1 and cur.key_size != bvol.key_size):
        raise ManageError("the header and key slot areas differ in size on the volume and "
                          "in the backup: not restored")
    if cur.uuid != bvol.uuid and not force:
        raise ManageError(f"the backup {path} is of another volume (UUID {bvol.uuid}, the "
                          f"volume's {cur.uuid}): not restored (forcing it is possible)")
