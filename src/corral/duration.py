"""Durations written as Go's time.ParseDuration accepts them ("300ms", "1.5h", "2h45m").

Go stores a duration as a signed 64-bit count of nanoseconds, so this module works in
whole nanoseconds too and returns seconds as a float.
"""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction

NANOSECONDS_PER_SECOND = 1_000_000_000

# Go's unit table (time.unitMap), in nanoseconds. Both the micro sign U+00B5 and the
# Greek small letter mu U+03BC spell microseconds.
_UNIT_NANOSECONDS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,
    "\u03bcs": 1_000,
    "ms": 1_000_000,
    "s": NANOSECONDS_PER_SECOND,
    "m": 60 * NANOSECONDS_PER_SECOND,
    "h": 3600 * NANOSECONDS_PER_SECOND,
}

_MIN_NANOSECONDS = -(2**63)
_MAX_NANOSECONDS = 2**63 - 1
_MIN_SECONDS = _MIN_NANOSECONDS / NANOSECONDS_PER_SECOND
_MAX_SECONDS = _MAX_NANOSECONDS / NANOSECONDS_PER_SECOND

# One "<digits>[.<digits>]<unit>" component. [0-9] is spelled out because \d would also
# match non-ASCII digits, which Go rejects. The unit is every character up to the next
# digit or '.', as in Go, so "1 s" has the unknown unit " s".
_COMPONENT = re.compile(r"([0-9]*)(?:\.([0-9]*))?([^0-9.]*)")

_EXPECTED = 'expected a number with a unit such as "10s", "1m30s" or "500ms"'


def parse_duration(text: str | int | float) -> float:
    """Parse a Go duration string, or a number of seconds, into seconds.

    Strings follow Go's time.ParseDuration: an optional sign, then one or more
    components of a decimal number and a unit (ns, us, µs, ms, s, m, h), with "0" allowed
    alone. Fractions finer than a nanosecond are truncated, as in Go, and numbers are
    rounded to the nearest nanosecond. Negative durations are accepted.

    Raises ValueError for malformed text or a value outside Go's range (about ±292
    years), and TypeError for anything other than str, int or float (bool included).
    """
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise TypeError(
            f"invalid duration {text!r}: expected a string such as \"10s\" "
            f"or a number of seconds, got {type(text).__name__}"
        )
    if isinstance(text, str):
        nanoseconds = _parse_nanoseconds(text)
    else:
        nanoseconds = seconds_to_nanoseconds(text)
    if not _MIN_NANOSECONDS <= nanoseconds <= _MAX_NANOSECONDS:
        raise ValueError(
            f"invalid duration {_quote(text)}: out of range; "
            f"the maximum is {_format_positive(_MAX_NANOSECONDS)}"
        )
    return nanoseconds / NANOSECONDS_PER_SECOND


def format_duration(seconds: float) -> str:
    """Format seconds in Go's duration syntax, dropping zero components.

    Spans of 1s or more read like "1h30m", "1m30.5s" or "1h5s". Shorter ones use the
    largest unit of ms, µs (U+00B5, as Go prints it) and ns that fits, such as "500ms"
    or "1.5µs". Zero is "0s". The value is first rounded to the nearest nanosecond, so
    parse_duration(format_duration(x)) == x for every x that parse_duration returns.

    Raises ValueError for NaN and infinities.
    """
    nanoseconds = seconds_to_nanoseconds(seconds)
    if nanoseconds == 0:
        return "0s"
    sign = "-" if nanoseconds < 0 else ""
    return sign + _format_positive(abs(nanoseconds))


def seconds_to_nanoseconds(seconds: float) -> int:
    """Convert seconds to the nearest whole number of nanoseconds, exactly.

    Raises ValueError for NaN and infinities.
    """
    if isinstance(seconds, float) and not math.isfinite(seconds):
        raise ValueError(f"invalid duration {seconds!r}: expected a finite number of seconds")
    # The floats nearest Go's limits lie a few hundred nanoseconds outside them, so they
    # map to the limits themselves. Without this, format_duration would print a value
    # that parse_duration returned as one that parse_duration rejects.
    if seconds == _MAX_SECONDS:
        return _MAX_NANOSECONDS
    if seconds == _MIN_SECONDS:
        return _MIN_NANOSECONDS
    # Fraction holds the float's exact binary value, so no rounding happens before round().
    return round(Fraction(seconds) * NANOSECONDS_PER_SECOND)


def _parse_nanoseconds(text: str) -> int:
    rest = text
    negative = False
    if rest[:1] in ("-", "+"):
        negative = rest[0] == "-"
        rest = rest[1:]
    if rest == "0":
        return 0
    if not rest:
        raise ValueError(f"invalid duration {_quote(text)}: {_EXPECTED}")

    total = 0
    position = 0
    while position < len(rest):
        match = _COMPONENT.match(rest, position)
        assert match is not None  # every part of the pattern can match the empty string
        whole, fraction, unit = match.groups()
        position = match.end()
        if not whole and not fraction:
            raise ValueError(f"invalid duration {_quote(text)}: {_EXPECTED}")
        if not unit:
            raise ValueError(f"invalid duration {_quote(text)}: missing unit; {_EXPECTED}")
        unit_size = _UNIT_NANOSECONDS.get(unit)
        if unit_size is None:
            raise ValueError(
                f"invalid duration {_quote(text)}: unknown unit {_quote(unit)}; "
                "expected one of ns, us, µs, ms, s, m, h"
            )
        total += _component_nanoseconds(whole, fraction or "", unit_size)
    return -total if negative else total


def _component_nanoseconds(whole: str, fraction: str, unit_size: int) -> int:
    nanoseconds = int(whole or "0") * unit_size
    if fraction:
        # Integer floor division truncates toward zero here, as Go's uint64 conversion does.
        nanoseconds += int(fraction) * unit_size // 10 ** len(fraction)
    return nanoseconds


def _format_positive(nanoseconds: int) -> str:
    if nanoseconds < 1_000:
        return f"{nanoseconds}ns"
    if nanoseconds < 1_000_000:
        return _format_decimal(nanoseconds, 1_000) + "\u00b5s"
    if nanoseconds < NANOSECONDS_PER_SECOND:
        return _format_decimal(nanoseconds, 1_000_000) + "ms"

    hours, rest = divmod(nanoseconds, _UNIT_NANOSECONDS["h"])
    minutes, rest = divmod(rest, _UNIT_NANOSECONDS["m"])
    parts = []
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if rest:
        parts.append(_format_decimal(rest, NANOSECONDS_PER_SECOND) + "s")
    return "".join(parts)


def _format_decimal(count: int, unit_size: int) -> str:
    """Write count / unit_size in decimal without trailing zeros; unit_size is a power of 10."""
    whole, remainder = divmod(count, unit_size)
    if not remainder:
        return str(whole)
    digits = len(str(unit_size)) - 1
    return f"{whole}.{str(remainder).zfill(digits).rstrip('0')}"


def _quote(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)
