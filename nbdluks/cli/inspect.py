"""`nbdluks inspect`: what `cryptsetup luksDump` shows, never a secret."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..luks import Argon2, Pbkdf2, Token, Volume
from ..nbd import UpstreamOptions
from ..unlock import SourceError, describe_pins, key_check, read_copy
from .options import check_args, hint, unlock_options

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
        "tokens": [_token(t) for t in vol.tokens],
        "servable": vol.unservable is None,
        "warnings": list(vol.warnings),
    }
    if vol.unservable is not None:
        out["unservable"] = vol.unservable
    if vol.reencryption is not None:
        out["reencryption"] = vol.reencryption.describe()
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
            "usable": True,
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
    for bad in vol.unusable:
        out["keyslots"].append({"id": bad.id, "usable": False, "type": bad.type,
                                "priority": _PRIORITY[bad.priority], "reason": str(bad.reason)})
    out["keyslots"].sort(key=lambda k: k["id"])
    return out


def _token(t: Token) -> dict[str, Any]:
    out: dict[str, Any] = {"id": t.id, "type": t.type, "keyslots": list(t.keyslots)}
    if t.type == "clevis":
        out["pins"] = describe_pins(t.json.get("jwe"))
    return out


def pin_text(pin: dict[str, Any]) -> str:
    """A clevis pin tree on one line."""
    if pin.get("pin") == "tang":
        return f"tang {pin['url']} (key {pin['kid']})"
    if pin.get("pin") == "sss":
        inner = "; ".join(pin_text(p) for p in pin.get("pins", []))
        return f"sss {pin.get('t')} of {len(pin.get('pins', []))} [{inner}]"
    if "error" in pin:
        return f"unreadable ({pin['error']})"
    return f"{pin.get('pin')} (cannot unlock here)"


def copy_info(source: str, vol: Volume | None, problem: str, first: Volume) -> dict[str, Any]:
    """One of several header copies, compared with the first valid one."""
    if vol is None:
        return {"source": source, "ok": False, "agrees": False, "error": problem}
    return {"source": source, "ok": True, "uuid": vol.uuid, "seqid": vol.seqid,
            "agrees": vol.identity() == first.identity()}


def _reencryption_lines(state: dict[str, Any] | None) -> list[str]:
    if state is None:
        return []
    lines = [f"Reencryption:   {state['mode']}, {state['direction']}, resilience "
             f"{state['resilience']} ({state['requirement']})"
             + (", a step was interrupted" if state["interrupted_step"] else "")]
    ends = [f"{e['cipher']}, sector size {e['sector_size']}" if e.get("cipher") else "plaintext"
            for e in (state.get("from", {}), state.get("to", {}))]
    lines.append(f"  parameters: {ends[0]} -> {ends[1]}")
    for s in state["segments"]:
        lines.append(f"  from {s['start']}: {s['size']} bytes at {s['offset']}, {s['key']} key")
    return lines


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
        *_reencryption_lines(info.get("reencryption")),
        "Keyslots:",
    ]
    for ks in info["keyslots"]:
        if ks.get("type") == "reencrypt":
            lines.append(f"  {ks['id']}: reencrypt (the reencryption's resilience area, no key)")
            continue
        if not ks["usable"]:
            lines.append(f"  {ks['id']}: {ks['type']}, priority {ks['priority']}, "
                         f"UNUSABLE: {ks['reason']}")
            continue
        kdf = ks["kdf"]
        params = ", ".join(f"{k}={v}" for k, v in kdf.items() if k not in ("type", "salt"))
        lines.append(
            f"  {ks['id']}: {kdf['type']} ({params}), priority {ks['priority']}, "
            f"{ks['cipher']} {ks['cipher_key_size']}-bit area at {ks['area_offset']}"
        )
    if info["tokens"]:
        lines.append("Tokens:")
        for t in info["tokens"]:
            pin = f", {pin_text(t['pins'])}" if "pins" in t else ""
            lines.append(f"  {t['id']}: {t['type']}, key slots "
                         f"{', '.join(map(str, t['keyslots'])) or '(none)'}{pin}")
    for w in info["warnings"]:
        lines.append(f"Warning: {w}")
    if not info["servable"]:
        lines.append(f"Cannot be served: {info['unservable']}")
    for c in info.get("copies", []):
        state = (f"ok, epoch {c['seqid']}, " + ("agrees" if c["agrees"] else
                 f"DIFFERENT VOLUME (UUID {c['uuid']})")) if c["ok"] else f"UNUSABLE: {c['error']}"
        lines.append(f"Header copy {c['source']}: {state}")
    check = info.get("key_check")
    if check is not None and check["ok"]:
        slot = check["keyslot"]
        lines.append("Key OK" + (f": key slot {slot} opened" if slot is not None
                                 else ": volume key matches"))
    elif check is not None:
        lines.append(f"Key FAILED: {check['reason']}")
    return "\n".join(lines)


def inspect(args: argparse.Namespace) -> int:
    check_args(args)
    keys = unlock_options(args)
    copies = [read_copy(src, keys.argon2_max_kib, UpstreamOptions()) for src in args.source]
    try:
        valid = [c for c in copies if c.vol is not None]
        if not valid:
            e = copies[0].error
            if len(copies) == 1 and e is not None:
                if isinstance(e, SourceError):
                    raise e
                raise SourceError(f"{copies[0].source}: {e}{hint(e)}")
            raise SourceError("no usable header: " + "; ".join(
                f"{c.source}: {c.problem}" for c in copies))
        first = valid[0]
        assert first.vol is not None
        info = describe(first.vol)
        status = 0
        if len(copies) > 1:
            info["copies"] = [copy_info(c.source, c.vol, c.problem, first.vol) for c in copies]
            if not all(c["ok"] and c["agrees"] for c in info["copies"]):
                status = 1
                valid = [first]  # never unlock through a copy of another volume
        if keys.given() or args.token_only or args.token_id is not None:
            info["key_check"], error = key_check(valid, keys)
            if error is not None:
                info["key_check"]["reason"] += hint(error)
                status = 1
    finally:
        for c in copies:
            c.close()
    print(json.dumps(info, indent=2) if args.json else render_text(info))
    return status
