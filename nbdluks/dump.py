"""`nbdluks inspect`: what `cryptsetup luksDump` shows, never a secret."""

from __future__ import annotations

from typing import Any

from .luks.volume import Argon2, Pbkdf2, Volume

_PRIORITY = {0: "ignored", 1: "normal", 2: "high"}


def describe(vol: Volume) -> dict[str, Any]:
    seg = vol.segment
    out: dict[str, Any] = {
        "version": vol.version,
        "uuid": vol.uuid,
        "label": vol.label,
        "subsystem": vol.subsystem,
        "cipher": seg.cipher,
        "sector_size": seg.sector_size,
        "key_size": vol.key_size * 8,
        "payload_offset": seg.offset,
        "payload_size": "dynamic" if seg.size is None else seg.size,
        "iv_tweak": seg.iv_tweak,
        "metadata_size": vol.metadata_size,
        "keyslots": [],
        "warnings": list(vol.warnings),
    }
    if vol.version == 1:
        out["hash"] = vol.hash_spec
        d = vol.digests[0]
        out["mk_digest"] = {"iterations": d.iterations, "salt": d.salt.hex(),
                            "digest": d.digest.hex()}
    else:
        out["header_copy"] = vol.copy
        out["epoch"] = vol.seqid
        out["checksum_alg"] = vol.checksum_alg
        out["metadata"] = vol.json
    for ks in vol.keyslots:
        kdf: dict[str, Any]
        if isinstance(ks.kdf, Pbkdf2):
            kdf = {"type": "pbkdf2", "hash": ks.kdf.hash, "iterations": ks.kdf.iterations}
        else:
            assert isinstance(ks.kdf, Argon2)
            kdf = {"type": ks.kdf.type, "time": ks.kdf.time, "memory": ks.kdf.memory,
                   "cpus": ks.kdf.cpus}
        kdf["salt"] = ks.kdf.salt.hex()
        out["keyslots"].append({
            "id": ks.id,
            "priority": _PRIORITY[ks.priority],
            "key_size": ks.key_size * 8,
            "cipher": ks.area_cipher,
            "cipher_key_size": ks.area_key_size * 8,
            "kdf": kdf,
            "af_stripes": ks.stripes,
            "af_hash": ks.af_hash,
            "area_offset": ks.area_offset,
            "area_size": ks.area_size,
        })
    return out


def render_text(info: dict[str, Any]) -> str:
    lines = [
        f"LUKS version:   {info['version']}",
        f"UUID:           {info['uuid']}",
    ]
    if info["version"] == 2:
        lines += [
            f"Label:          {info['label'] or '(no label)'}",
            f"Subsystem:      {info['subsystem'] or '(no subsystem)'}",
            f"Epoch:          {info['epoch']}",
            f"Header copy:    {info['header_copy']}",
        ]
    else:
        lines.append(f"Hash spec:      {info['hash']}")
    lines += [
        f"Cipher:         {info['cipher']}",
        f"Key size:       {info['key_size']} bits",
        f"Sector size:    {info['sector_size']}",
        f"Payload offset: {info['payload_offset']} [bytes]",
        f"Payload size:   {info['payload_size']}",
        "Keyslots:",
    ]
    for ks in info["keyslots"]:
        kdf = ks["kdf"]
        params = ", ".join(f"{k}={v}" for k, v in kdf.items() if k not in ("type", "salt"))
        lines.append(
            f"  {ks['id']}: {kdf['type']} ({params}), priority {ks['priority']}, "
            f"{ks['cipher']} {ks['cipher_key_size']}-bit area at {ks['area_offset']}"
        )
    for w in info["warnings"]:
        lines.append(f"Warning: {w}")
    return "\n".join(lines)
