"""Replace secret values with ``***`` in everything the engine returns."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, quote_plus

from pymysql.converters import escape_string

MASK = "***"
MIN_PREFIX = 3  # a cut-off secret at the end of truncated output is masked from this many characters on
URI_SAFE = "!#$%&'()*+,/:;=?@[]~"  # what requests leaves as it is when it quotes a URL again
MIN_ENCODED = 7  # bytes: a shorter secret is not looked for in base64, whose runs of it would mask innocent text too
MIN_LINE = 4  # characters: a shorter line of a multi-line secret is not masked on its own (nor is a blank one)


def encoded(secret: str) -> set[str]:
    """The characters of a secret's base64 forms (standard and URL-safe) that it alone decides, at each of the three
    places it can start within the encoding's 3-byte groups: found inside any base64 text that holds the secret,
    such as an HTTP Basic ``Authorization`` header of ``user:secret``. The characters at either end, which the bytes
    around the secret also decide, are left out; each run is 8 characters or more."""
    data = secret.encode()
    if len(data) < MIN_ENCODED:
        return set()
    found = set()
    for offset in range(3):  # bytes of the encoded text before the secret, modulo 3
        text = base64.b64encode(bytes(offset) + data).decode()
        first, end = -(-offset * 8 // 6), (offset + len(data)) * 8 // 6  # characters made of the secret's bits only
        core = text[first:end]
        found |= {core, core.replace("+", "-").replace("/", "_")}
    return found


def forms(secret: str) -> set[str]:
    """The secret and the forms it takes in what a task reports: in lower or upper case (a host name in an
    error, a hex digest), quoted into a URL (as requests and ``urllib.parse`` do), escaped in a JSON string or a
    Python ``repr``, escaped as MySQL echoes a bound value in its errors, and inside base64 text (``encoded``).
    Each line of a multi-line secret (a key in PEM form) is masked on its own too, in each of these forms, as
    output prefixed or reflowed line by line shows it. A short secret with no character to escape has only
    itself."""
    lines = [line.strip() for line in secret.splitlines()] if "\n" in secret or "\r" in secret else []
    return _forms(secret).union(*(_forms(line) for line in lines if len(line) >= MIN_LINE))


def _forms(secret: str) -> set[str]:
    found = {
        secret,
        secret.lower(),
        secret.upper(),
        quote(secret, safe=""),
        quote(secret, safe=URI_SAFE),
        quote_plus(secret),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        repr(secret)[1:-1],
        escape_string(secret),
        *encoded(secret),
    }
    return {form for form in found if form}


class Redactor:
    """Masks every occurrence of the given secret values, in each of their ``forms``, longest first, in strings
    and nested values."""

    def __init__(self, secrets: Iterable[object] = ()) -> None:
        values = {form for s in secrets if s is not None and str(s) != "" for form in forms(str(s))}
        self.values = sorted(values, key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self.values)

    def text(self, text: str) -> str:
        """Return ``text`` with every secret masked."""
        for value in self.values:
            if value in text:
                text = text.replace(value, MASK)
        return text

    def cut_text(self, text: str) -> str:
        """Like ``text``, and also mask a secret's beginning left at the very end of cut-off output."""
        text = self.text(text)
        for value in self.values:
            for size in range(min(len(value) - 1, len(text)), MIN_PREFIX - 1, -1):
                if text.endswith(value[:size]):
                    return text[:-size] + MASK
        return text

    def value(self, value: Any) -> Any:
        """Return ``value`` with every string inside it masked (mappings and lists are copied)."""
        if not self.values:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.value(k): self.value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.value(v) for v in value]
        return value
