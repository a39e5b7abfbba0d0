from typing import Any

def crypt(init: int, update: int, ctx: int, buf: Any, unit: int, first: int, step: int,
          mode: int, ivs: Any) -> None: ...
