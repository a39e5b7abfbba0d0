"""Unlocking through LUKS2 tokens, as `cryptsetup open` does when no key is
given: a clevis token's JWE, decrypted by its pins (Tang servers), yields
the passphrase of the key slots the token is bound to. Nothing secret is
stored on the serving host.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog

from ..luks import (
    Keyslot,
    LuksError,
    Token,
    Unlocked,
    UnsupportedError,
    Volume,
    WrongKeyError,
    reencryption_keys,
    unlock_with_passphrase,
    wipe,
)
from .clevis.jose import clip, label
from .clevis.pins import PinError, decrypt

log = structlog.get_logger("nbdluks.open")

UNLOCKING_TYPES = ("clevis",)


@dataclass(frozen=True)
class TokenOptions:
    """Which tokens may unlock, and how long a pin's server may take."""

    token_id: int | None = None
    token_type: str | None = None
    timeout: float = 10.0  # seconds per Tang exchange: connect, send and the whole answer


class TokenError(LuksError):
    """No token unlocked the volume: names each token's failure."""


class NoTokenError(TokenError):
    """No key was given, and the volume has no token that could unlock it."""


def candidates(vol: Volume, opts: TokenOptions) -> list[Token]:
    tokens = [t for t in vol.tokens
              if (opts.token_id is None or t.id == opts.token_id)
              and (opts.token_type is None or t.type == opts.token_type)]
    if opts.token_id is not None and not tokens:
        raise TokenError(f"token {opts.token_id} does not exist"
                         + (f" with type {opts.token_type!r}" if opts.token_type else ""))
    return tokens


def unlock_with_tokens(vol: Volume, read_area: Callable[[Keyslot], bytes], opts: TokenOptions,
                       only_slot: int | None = None, kdf_limit: float | None = None
                       ) -> Unlocked:
    tokens = candidates(vol, opts)
    if not tokens:
        raise NoTokenError("no key was given and the volume has no token to unlock with")
    failures: list[str] = []
    for token in tokens:
        try:
            unlocked = _unlock_with(vol, token, read_area, opts, only_slot, kdf_limit)
        except (PinError, LuksError) as e:
            failures.append(f"token {token.id} ({label(token.type)}): {e}")
            continue
        except Exception as e:  # one token's bug must not keep the next from being tried
            failures.append(f"token {token.id} ({label(token.type)}): unexpected "
                            f"{type(e).__name__}")
            continue
        if failures:  # (when none unlocks, the error names them all, on one line)
            log.warning("tokens did not unlock before this one", failures=failures)
        return unlocked
    raise TokenError("no token unlocked the volume: " + "; ".join(failures))


def recover(token: Token, opts: TokenOptions) -> bytearray:
    """The passphrase a token's pins recover (the caller wipes it)."""
    if token.type not in UNLOCKING_TYPES:
        raise UnsupportedError(f"tokens of type {clip(token.type)} cannot unlock here")
    try:
        return decrypt(token.json.get("jwe"), opts.timeout)
    except PinError as e:
        raise TokenError(f"token {token.id} ({label(token.type)}): {e}") from None


def _unlock_with(vol: Volume, token: Token, read_area: Callable[[Keyslot], bytes],
                 opts: TokenOptions, only_slot: int | None, kdf_limit: float | None,
                 ) -> Unlocked:
    if token.type not in UNLOCKING_TYPES:
        raise UnsupportedError(f"tokens of type {clip(token.type)} cannot unlock here")
    slots = [k for k in token.keyslots if only_slot is None or k == only_slot]
    if not slots:
        raise WrongKeyError(f"the token is not bound to key slot {only_slot}")
    passphrase = decrypt(token.json.get("jwe"), opts.timeout)
    try:
        for slot in slots:
            try:
                unlocked = unlock_with_passphrase(vol, passphrase, read_area, slot, kdf_limit)
            except WrongKeyError:
                continue
            log.info("unlocked through a token", token=token.id, type=token.type,
                     keyslot=unlocked.keyslot)
            return _both_keys(vol, unlocked, passphrase, read_area, kdf_limit)
    finally:
        wipe(passphrase)
    raise WrongKeyError("the passphrase its pins recovered opens none of key slots "
                        + ", ".join(map(str, slots)))


def _both_keys(vol: Volume, unlocked: Unlocked, passphrase: bytearray,
               read_area: Callable[[Keyslot], bytes], kdf_limit: float | None) -> Unlocked:
    """A volume in reencryption needs both keys: the token names the old
    key's slot and the new one's (a rotation gives the new slot the old
    one's tokens and passphrase, as cryptsetup's reencrypt does)."""
    if vol.reencryption is not None:
        try:
            unlocked.keys = reencryption_keys(vol, passphrase, read_area, unlocked, kdf_limit)
        except BaseException:
            unlocked.wipe()
            raise
    return unlocked
