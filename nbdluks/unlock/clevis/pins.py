"""Decrypting a clevis JWE: the pin its header names recovers the content
key -- "tang" over HTTP(S) from a Tang server, "sss" from a threshold of
nested pins asked at once. Other pins (tpm2, pkcs11, ...) need local
hardware and are refused by name.

What a token holds and what a server answers come from outside: the pin
tree is read whole and bounded (pins per sss pin, depth, pins in all)
before anything is asked; the Tang exchanges of one token run on a few
threads, each within one deadline (connect, send and every read); every
failure is a PinError naming the pin and its URL, never a secret.
"""

from __future__ import annotations

import queue
import re
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any

from ...errors import NbdluksError
from . import sss
from .http import Endpoint, exchange
from .jose import JoseError, Jwe, clip, label
from .tang import Recovery, TangPin

MAX_DEPTH = 4  # sss pins within sss pins
MAX_TREE = 64  # pins in all, in one token
THREADS = 8  # Tang exchanges at once, for one token


class PinError(NbdluksError):
    """A pin that could not recover its key: names the pin and why."""


class _LimitError(PinError):
    """A pin tree beyond the bounds: refused whole, not as one failed pin."""


def _wipe(buf: bytearray) -> None:
    buf[:] = bytes(len(buf))


def shown(url: str) -> str:
    """A URL from a token, for a message: one line, no credentials, cut short."""
    text = re.sub(r"[^ -~]", "?", re.sub(r"//[^/@]*@", "//...@", url))
    return text if len(text) <= 200 else text[:197] + "..."


@dataclass(frozen=True)
class _Tang:
    jwe: Jwe
    header: dict[str, Any]
    pin: TangPin

    @property
    def where(self) -> str:
        return f"tang {shown(self.pin.url)}"


@dataclass(frozen=True)
class _Sss:
    jwe: Jwe
    cfg: sss.Config
    pins: list[_Tang | _Sss | PinError]  # a pin that cannot be asked is its error


def _plan(jwe: Any, depth: int, budget: list[int]) -> _Tang | _Sss:
    """The pin tree of a JWE, checked and bounded; nothing is asked yet."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _LimitError(f"sss: more than {MAX_TREE} pins in all")
    try:
        parsed = Jwe.parse(jwe)
        hdr = parsed.header
    except JoseError as e:
        raise PinError(f"clevis JWE: {e}") from None
    clevis = hdr.get("clevis")
    pin = clevis.get("pin") if isinstance(clevis, dict) else None
    if pin == "tang":
        tang = clevis.get("tang") if isinstance(clevis, dict) else None
        url = tang.get("url") if isinstance(tang, dict) else None
        try:
            node = _Tang(parsed, hdr, TangPin.from_header(hdr))
            Endpoint.parse(node.pin.url, node.pin.kid)
        except JoseError as e:
            where = f"tang {shown(url)}" if isinstance(url, str) else "tang"
            raise PinError(f"{where}: {e}") from None
        return node
    if pin != "sss" or not isinstance(clevis, dict):
        raise PinError(f"pin {clip(pin)} is not supported here (only tang and sss)")
    if depth >= MAX_DEPTH:
        raise _LimitError(f"sss: pins nested more than {MAX_DEPTH} deep")
    try:
        cfg = sss.Config.from_header(clevis)
    except JoseError as e:
        raise PinError(f"sss: {e}") from None
    return _Sss(parsed, cfg, [_nested(j, depth + 1, budget) for j in cfg.jwes])


def _nested(jwe: Any, depth: int, budget: list[int]) -> _Tang | _Sss | PinError:
    try:
        return _plan(jwe, depth, budget)
    except _LimitError:
        raise
    except PinError as e:
        return e


def _leaves(node: _Tang | _Sss | PinError) -> int:
    if isinstance(node, _Sss):
        return sum(_leaves(n) for n in node.pins)
    return 1 if isinstance(node, _Tang) else 0


def decrypt(jwe: Any, timeout: float) -> bytearray:
    """The plaintext of a clevis JWE (a compact string or a LUKS2 token's
    flattened object); a PinError naming each failed pin otherwise. Each Tang
    exchange has `timeout` seconds in all."""
    try:
        root = _plan(jwe, 0, [MAX_TREE])
        if isinstance(root, _Tang):
            return _tang(root, timeout)
        pool = _Pool(min(THREADS, _leaves(root)))
        try:
            return _schedule(root, pool, timeout).result()
        finally:
            pool.close()
    except PinError:
        raise
    except Exception as e:  # a bug must still be one token's failure, not the end
        raise PinError(f"clevis: unexpected {type(e).__name__}") from None


def _tang(node: _Tang, timeout: float) -> bytearray:
    try:
        rec = Recovery(node.pin, node.header)
        cek = bytearray(rec.finish(exchange(rec.endpoint, rec.request, timeout)))
        try:
            return node.jwe.decrypt(cek)
        finally:
            _wipe(cek)
    except (JoseError, OSError, UnicodeError) as e:
        raise PinError(f"{node.where}: {reason(e, timeout)}") from None


def reason(e: JoseError | OSError | UnicodeError, timeout: float) -> str:
    """Why a Tang server could not be asked (an exchange, or at binding the
    fetch of its advertisement), for a message."""
    if isinstance(e, JoseError):
        return str(e)
    if isinstance(e, TimeoutError):
        return f"timed out (no answer within {timeout:g} s)"
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS: certificate verify failed: {e.verify_message}"
    if isinstance(e, ssl.SSLError):
        return f"TLS: {e.reason or type(e).__name__}"
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    return "the URL's host name is not valid"  # (one the resolver cannot encode)


class _Pool:
    """At most `size` daemon threads, started on demand, run one token's Tang
    exchanges; `close` ends them once what they run is over."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.threads = 0
        self.jobs: queue.SimpleQueue[tuple[Future[bytearray], Callable[[], bytearray]] | None] \
            = queue.SimpleQueue()

    def submit(self, job: Callable[[], bytearray]) -> Future[bytearray]:
        future: Future[bytearray] = Future()
        self.jobs.put((future, job))
        if self.threads < self.size:
            self.threads += 1
            threading.Thread(target=self._work, name="clevis-pin", daemon=True).start()
        return future

    def _work(self) -> None:
        while (item := self.jobs.get()) is not None:
            future, job = item
            if not future.set_running_or_notify_cancel():
                continue  # its sss pin was decided without it
            try:
                future.set_result(job())
            except BaseException as e:  # the future carries it
                future.set_exception(e)

    def close(self) -> None:
        for _ in range(self.threads):
            self.jobs.put(None)


def _failed(error: PinError) -> Future[bytearray]:
    future: Future[bytearray] = Future()
    future.set_exception(error)
    return future


def _schedule(node: _Tang | _Sss | PinError, pool: _Pool, timeout: float) -> Future[bytearray]:
    if isinstance(node, PinError):
        return _failed(node)
    if isinstance(node, _Tang):
        return pool.submit(lambda: _tang(node, timeout))
    return _Gather(node, [_schedule(n, pool, timeout) for n in node.pins]).future


class _Gather:
    """An sss pin under way: decided once `t` of its pins answered, or all
    did without enough; then what it no longer needs is cancelled."""

    def __init__(self, node: _Sss, pins: list[Future[bytearray]]) -> None:
        self.node = node
        self.pins = pins
        self.points: list[bytearray] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.future: Future[bytearray] = Future()
        self.future.add_done_callback(lambda _: [p.cancel() for p in self.pins])
        for pin in pins:
            pin.add_done_callback(self._answered)

    def _answered(self, pin: Future[bytearray]) -> None:
        try:
            with self.lock:
                outcome = _outcome(pin)
                if self.future.done():
                    if isinstance(outcome, bytearray):
                        _wipe(outcome)
                    return
                if isinstance(outcome, bytearray):
                    self.points.append(outcome)
                else:
                    self.errors.append(outcome)
                decided = self._decide()
        except Exception as e:  # (callbacks' errors would be lost, and the pin never decided)
            decided = PinError(f"sss: unexpected {type(e).__name__}")
        if decided is not None:
            self._settle(decided)

    def _decide(self) -> bytearray | PinError | None:
        cfg, n = self.node.cfg, len(self.pins)
        if len(self.points) < cfg.t and len(self.points) + len(self.errors) < n:
            return None
        try:
            if len(self.points) < cfg.t:
                return PinError(f"sss needs {cfg.t} of {n} pins, {len(self.points)} answered: "
                                + "; ".join(self.errors))
            key = sss.recover(cfg.p, cfg.size, self.points[: cfg.t])
            try:
                return self.node.jwe.decrypt(key)
            finally:
                _wipe(key)
        except JoseError as e:
            return PinError(f"sss: {e}")
        finally:
            for point in self.points:
                _wipe(point)

    def _settle(self, decided: bytearray | PinError) -> None:
        try:
            if isinstance(decided, PinError):
                self.future.set_exception(decided)
            else:
                self.future.set_result(decided)
        except InvalidStateError:  # cancelled meanwhile: nobody wants it
            if isinstance(decided, bytearray):
                _wipe(decided)


def _outcome(pin: Future[bytearray]) -> bytearray | str:
    if pin.cancelled():
        return "cancelled"
    error = pin.exception()
    if error is None:
        return pin.result()
    return str(error) if isinstance(error, PinError) else f"unexpected {type(error).__name__}"


def describe(jwe: Any) -> dict[str, Any]:
    """The pin tree of a clevis JWE, for inspect (no network, no secret)."""
    return _describe(jwe, 0, [MAX_TREE])


def _describe(jwe: Any, depth: int, budget: list[int]) -> dict[str, Any]:
    try:
        budget[0] -= 1
        if budget[0] < 0:
            raise JoseError(f"more than {MAX_TREE} pins in all")
        hdr = Jwe.parse(jwe).header
        clevis = hdr.get("clevis")
        pin = clevis.get("pin") if isinstance(clevis, dict) else None
        if pin == "tang":
            tp = TangPin.from_header(hdr)
            return {"pin": "tang", "url": shown(tp.url), "kid": tp.kid}
        if pin == "sss" and isinstance(clevis, dict):
            if depth >= MAX_DEPTH:
                raise JoseError(f"sss pins nested more than {MAX_DEPTH} deep")
            cfg = sss.Config.from_header(clevis)
            return {"pin": "sss", "t": cfg.t,
                    "pins": [_describe(j, depth + 1, budget) for j in cfg.jwes]}
        return {"pin": label(pin), "usable": False}
    except Exception as e:  # whatever a header holds, inspect shows the rest
        reason = str(e) if isinstance(e, JoseError) else f"unexpected {type(e).__name__}"
        return {"pin": None, "error": reason}
