"""The start and the end of a volume key's rotation, in cryptsetup's
on-disk terms (LUKS2 online-reencrypt-v2, mode reencrypt, forward).

Start: an unbound digest for the new key (no segment uses it) and, for each
key slot carried over, a slot holding the new key under the same
passphrase and named by the same tokens, each in its own header write
(edit.add_key); then ONE header
write that turns the reencryption on: the backup segments, the `reencrypt`
key slot with its resilience area, the verification digest over both keys
and the parameters, and the requirement flag (cryptsetup's reencrypt_init).

End: ONE header write with only the new key's slots, one segment and no
trace of the reencryption, then the old slots' areas wiped. cryptsetup
commits the end in several writes, and a crash between them makes its
resume transform new data again (docs/cryptsetup-reencryption.md, 11.1).
Pure: the caller performs the steps.
"""

from __future__ import annotations

import copy
import secrets
from dataclasses import dataclass
from typing import Any

from . import reencrypt
from .edit import Luks2Header, b64
from .encode import Step, Sync, Write
from .errors import HeaderError, UnsupportedError
from .hotzone import backup
from .luks2_json import u64
from .reencrypt import RESILIENCES
from .seal import SALT_SIZE, key_digest

REQUIREMENT = "online-reencrypt-v2"
VERSION = 2


@dataclass(frozen=True)
class RotationSpec:
    """The new data parameters and how each step is protected."""

    cipher: str
    key_size: int  # bytes
    sector_size: int
    resilience: str = "checksum"
    hash: str = "sha256"  # of the checksums
    alignment: int = 512  # the checksum block: the largest sector size in play

    def check(self) -> None:
        if self.resilience not in RESILIENCES:
            raise UnsupportedError(f"resilience {self.resilience!r} is not one of "
                                   f"{', '.join(RESILIENCES)}")


def _free_id(section: dict[str, Any]) -> str:
    return str(next(i for i in range(len(section) + 1) if str(i) not in section))


def new_digest(header: Luks2Header, key: bytes | bytearray, hash_name: str,
               iterations: int) -> str:
    """A digest that recognises `key` and that no segment uses yet (the
    first new key slot's header write carries it)."""
    did = _free_id(header.md["digests"])
    salt = secrets.token_bytes(SALT_SIZE)
    header.md["digests"][did] = {
        "type": "pbkdf2", "keyslots": [], "segments": [], "hash": hash_name,
        "iterations": iterations, "salt": b64(salt),
        "digest": b64(key_digest(key, hash_name, iterations, salt, 32))}
    return did


def carry_tokens(header: Luks2Header, old: int, new: int) -> list[int]:
    """Every token that names key slot `old` names `new` too (cryptsetup's
    reencrypt: assign_tokens); at the end the old slot's removal leaves
    them naming the new one only. The tokens' ids."""
    moved = []
    for tid, token in header.md["tokens"].items():
        if str(old) in token["keyslots"] and str(new) not in token["keyslots"]:
            token["keyslots"].append(str(new))
            moved.append(int(tid))
    return moved


def data_digest(md: dict[str, Any]) -> str:
    """The digest of the (one) data segment."""
    return str(next(d for d, v in md["digests"].items() if "0" in v["segments"]))


def begin(header: Luks2Header, spec: RotationSpec, new: str, old_key: bytes | bytearray,
          new_key: bytes | bytearray, iterations: int) -> list[Step]:
    """The header write that starts the reencryption (nothing before it
    changes what a reader sees: the new slots are unbound until here)."""
    spec.check()
    md = header.md
    if set(md["segments"]) != {"0"} or md["segments"]["0"]["type"] != "crypt":
        raise UnsupportedError("only a volume with one crypt segment can be reencrypted")
    seg = md["segments"]["0"]
    if seg["size"] != "dynamic" and u64(seg["size"]) % max(spec.sector_size,
                                                           seg["sector_size"]):
        raise UnsupportedError(f"the data size {seg['size']} is not a multiple of the new "
                               f"sector size {spec.sector_size}")
    old = data_digest(md)
    final = {"type": "crypt", "offset": seg["offset"], "size": seg["size"], "iv_tweak": "0",
             "encryption": spec.cipher, "sector_size": spec.sector_size,
             "flags": ["backup-final"]}
    md["segments"]["1"] = {**copy.deepcopy(seg), "flags": ["backup-previous"]}
    md["segments"]["2"] = final
    md["digests"][old]["segments"] = ["0", "1"]
    md["digests"][new]["segments"] = ["2"]
    offset, size = header.largest_gap()
    area: dict[str, Any] = {"type": spec.resilience, "offset": str(offset), "size": str(size)}
    if spec.resilience == "checksum":
        area.update(hash=spec.hash, sector_size=spec.alignment)
    if size < spec.alignment:
        raise HeaderError("the keyslots area has no room for the reencryption's resilience")
    slot = str(header.free_slot())
    header.slots[slot] = {"type": "reencrypt", "key_size": 1, "mode": "reencrypt",
                          "direction": "forward", "priority": 0, "area": area}
    requirements = md["config"].setdefault("requirements", {})
    requirements.setdefault("mandatory", []).append(REQUIREMENT)
    salt = secrets.token_bytes(SALT_SIZE)
    message = reencrypt.message(md, VERSION, old, new, old_key, new_key)
    md["digests"][_free_id(md["digests"])] = {
        "type": "pbkdf2", "keyslots": [slot], "segments": [], "hash": "sha256",
        "iterations": iterations, "salt": b64(salt),
        "digest": b64(key_digest(message, "sha256", iterations, salt, 32))}
    return header.writes()


def finish(header: Luks2Header, old: str, new: str) -> list[Step]:
    """The final header write, then the old key slots and the resilience
    area wiped (random bytes) and synced."""
    md = header.md
    final, prev = backup(md, "backup-final"), backup(md, "backup-previous")
    gone = [int(k) for k in md["digests"][old]["keyslots"]] + [
        int(k) for k, v in md["keyslots"].items() if v["type"] == "reencrypt"]
    areas = [header.area(k) for k in gone]
    for k in gone:
        header.remove_slot(k)
    md["segments"] = {"0": {**{k: v for k, v in final.items() if k != "flags"},
                            "size": prev["size"]}}
    for did in list(md["digests"]):
        entry = md["digests"][did]
        entry["segments"] = ["0"] if did == new else []
        if not entry["keyslots"] and did != new:
            del md["digests"][did]
    requirements = md["config"].get("requirements", {})
    mandatory = [f for f in requirements.get("mandatory", [])
                 if f != "online-reencrypt" and not f.startswith("online-reencrypt-v")]
    if mandatory:
        requirements["mandatory"] = mandatory
    else:
        requirements.pop("mandatory", None)
        if not requirements:
            md["config"].pop("requirements", None)
    return [*header.writes(), *(Write(off, secrets.token_bytes(size)) for off, size in areas),
            Sync()]
