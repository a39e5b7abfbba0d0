"""Decrypting a clevis JWE: the pin its header names recovers the content
key -- "tang" over HTTP from a Tang server, "sss" from a threshold of
nested pins asked at once. Other pins (tpm2, pkcs11, ...) need local
hardware and are refused by name. Every wait is bounded by a timeout.
"""

from __future__ import annotations

import queue
import threading
import urllib.error
import urllib.request
from typing import Any

from ...errors import NbdluksError
from . import sss
from .jose import JoseError, Jwe, b64d
from .tang import Recovery, TangPin

# Largest answer read from a Tang server (a JWK is a few hundred bytes).
_MAX_REPLY = 64 * 1024


class PinError(NbdluksError):
    """A pin that could not recover its key: names the pin and why."""


def _wipe(buf: bytearray) -> None:
    buf[:] = bytes(len(buf))


def decrypt(jwe: Any, timeout: float) -> bytearray:
    """The plaintext of a clevis JWE (a compact string or a LUKS2 token's
    flattened object); PinError naming each failed pin otherwise."""
    try:
        parsed = Jwe.parse(jwe)
        hdr = parsed.header
    except JoseError as e:
        raise PinError(f"clevis JWE: {e}") from None
    pin = hdr.get("clevis", {}).get("pin") if isinstance(hdr.get("clevis"), dict) else None
    if pin == "tang":
        cek = _tang(hdr, timeout)
    elif pin == "sss":
        cek = _sss(hdr, timeout)
    else:
        raise PinError(f"pin {pin!r} is not supported here (only tang and sss)")
    try:
        return parsed.decrypt(cek)
    except JoseError as e:
        raise PinError(f"{pin}: {e}") from None
    finally:
        _wipe(cek)


def _tang(hdr: dict[str, Any], timeout: float) -> bytearray:
    try:
        rec = Recovery(TangPin.from_header(hdr), hdr)
    except JoseError as e:
        raise PinError(f"tang: {e}") from None
    where = f"tang {rec.pin.url}"
    req = urllib.request.Request(rec.url, data=rec.request, method="POST",
                                 headers={"Content-Type": "application/jwk+json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as answer:
            reply = answer.read(_MAX_REPLY + 1)
    except urllib.error.HTTPError as e:
        raise PinError(f"{where}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise PinError(f"{where}: {getattr(reason, 'strerror', None) or reason}") from None
    if len(reply) > _MAX_REPLY:
        raise PinError(f"{where}: the answer is too large")
    try:
        return bytearray(rec.finish(reply))
    except JoseError as e:
        raise PinError(f"{where}: {e}") from None


def _sss(hdr: dict[str, Any], timeout: float) -> bytearray:
    cfg = hdr["clevis"].get("sss")
    try:
        if not isinstance(cfg, dict) or not isinstance(cfg.get("jwe"), list):
            raise JoseError("no nested pins")
        t, jwes = cfg.get("t"), cfg["jwe"]
        if not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= len(jwes):
            raise JoseError(f"threshold {t!r} of {len(jwes)} pins")
        prime_bytes = b64d(cfg.get("p"))
    except JoseError as e:
        raise PinError(f"sss: {e}") from None
    points, errors = _ask_all(jwes, t, timeout)
    try:
        if len(points) < t:
            raise PinError(f"sss needs {t} of {len(jwes)} pins, {len(points)} answered: "
                           + "; ".join(errors))
        try:
            return sss.recover(int.from_bytes(prime_bytes, "big"), len(prime_bytes),
                               points[:t])
        except JoseError as e:
            raise PinError(f"sss: {e}") from None
    finally:
        for pt in points:
            _wipe(pt)


def _ask_all(jwes: list[Any], t: int, timeout: float) -> tuple[list[bytearray], list[str]]:
    """Decrypt the nested pins at once, until `t` answered or too many failed."""
    results: queue.Queue[tuple[bytearray | None, str]] = queue.Queue()

    def ask(jwe: Any) -> None:
        try:
            results.put((decrypt(jwe, timeout), ""))
        except PinError as e:
            results.put((None, str(e)))
        except Exception as e:  # a nested pin's bug is that pin's failure only
            results.put((None, f"{type(e).__name__}"))

    for jwe in jwes:
        threading.Thread(target=ask, args=(jwe,), name="clevis-pin", daemon=True).start()
    points: list[bytearray] = []
    errors: list[str] = []
    while len(points) < t and len(points) + len(errors) < len(jwes):
        point, error = results.get()
        if point is None:
            errors.append(error)
        else:
            points.append(point)
    return points, errors


def describe(jwe: Any) -> dict[str, Any]:
    """The pin tree of a clevis JWE, for inspect (no network, no secret)."""
    try:
        hdr = Jwe.parse(jwe).header
        clevis = hdr.get("clevis")
        pin = clevis.get("pin") if isinstance(clevis, dict) else None
        if pin == "tang":
            tp = TangPin.from_header(hdr)
            return {"pin": "tang", "url": tp.url, "kid": tp.kid}
        if pin == "sss":
            cfg = clevis.get("sss", {})  # type: ignore[union-attr]
            nested = cfg.get("jwe", [])
            return {"pin": "sss", "t": cfg.get("t"), "pins": [describe(j) for j in nested]}
        return {"pin": pin, "usable": False}
    except (JoseError, AttributeError, TypeError) as e:
        return {"pin": None, "error": str(e)}
