import math

import pytest

from corral.duration import format_duration, parse_duration, seconds_to_nanoseconds

GO_MAX = "2562047h47m16.854775807s"
GO_MIN = "-2562047h47m16.854775808s"

# Inputs that Go's time.ParseDuration accepts, with the value in seconds.
VALID = [
    ("0", 0.0),
    ("+0", 0.0),
    ("-0", 0.0),
    ("0s", 0.0),
    ("5s", 5.0),
    ("300ms", 0.3),
    ("1.5h", 5400.0),
    ("2h45m", 9900.0),
    ("1m30s", 90.0),
    ("1h2m3s4ms", 3723.004),
    (".5s", 0.5),
    ("1.s", 1.0),
    ("-1.5h", -5400.0),
    ("+5s", 5.0),
    ("10ns", 1e-8),
    ("10us", 1e-5),
    ("10\u00b5s", 1e-5),
    ("10\u03bcs", 1e-5),
    ("1s1s", 2.0),
    ("1s1h", 3601.0),
    ("0.1234567891s", 0.123456789),
    ("00001s", 1.0),
    ("1.000000001s", 1.000000001),
]

# Inputs that Go rejects, with a fragment the error message must contain.
INVALID = [
    ("", "expected a number with a unit"),
    ("s", "expected a number with a unit"),
    (".s", "expected a number with a unit"),
    (".", "expected a number with a unit"),
    ("-", "expected a number with a unit"),
    ("+-1s", "expected a number with a unit"),
    ("1", "missing unit"),
    ("00", "missing unit"),
    ("1s2", "missing unit"),
    ("5x", 'unknown unit "x"'),
    ("1 s", 'unknown unit " s"'),
    ("1S", 'unknown unit "S"'),
    ("1sec", 'unknown unit "sec"'),
    (" 1s", "expected a number with a unit"),
    ("1s ", 'unknown unit "s "'),
    ("\u0661s", "expected a number with a unit"),
    ("1e3s", 'unknown unit "e"'),
    ("2562047h47m16.854775808s", "out of range"),
    ("-2562047h47m16.854775809s", "out of range"),
    ("3000000h", "out of range"),
]


@pytest.mark.parametrize(("text", "seconds"), VALID)
def test_parse_valid(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "fragment"), INVALID)
def test_parse_invalid(text, fragment):
    with pytest.raises(ValueError) as caught:
        parse_duration(text)
    message = str(caught.value)
    assert message.startswith(f'invalid duration "{text}"')
    assert fragment in message


def test_parse_error_message_wording():
    with pytest.raises(ValueError) as caught:
        parse_duration("5x")
    assert str(caught.value) == (
        'invalid duration "5x": unknown unit "x"; expected one of ns, us, µs, ms, s, m, h'
    )
    with pytest.raises(ValueError) as caught:
        parse_duration("")
    assert str(caught.value) == (
        'invalid duration "": expected a number with a unit such as "10s", "1m30s" or "500ms"'
    )


def test_parse_go_limits():
    assert parse_duration(GO_MAX) == (2**63 - 1) / 1e9
    assert parse_duration(GO_MIN) == -(2**63) / 1e9


@pytest.mark.parametrize(("number", "seconds"), [(5, 5.0), (0.25, 0.25), (-2, -2.0), (0, 0.0)])
def test_parse_number_is_seconds(number, seconds):
    assert parse_duration(number) == seconds


def test_parse_number_rounds_to_nanoseconds():
    assert parse_duration(1.0000000004) == 1.0
    assert parse_duration(1e-12) == 0.0


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_parse_non_finite_number(number):
    with pytest.raises(ValueError, match="finite"):
        parse_duration(number)


def test_parse_number_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        parse_duration(1e12)


@pytest.mark.parametrize("value", [True, None, [1], b"5s"])
def test_parse_wrong_type(value):
    with pytest.raises(TypeError) as caught:
        parse_duration(value)
    assert repr(value) in str(caught.value)


FORMATTED = [
    (0.0, "0s"),
    (2.0, "2s"),
    (90.0, "1m30s"),
    (0.5, "500ms"),
    (0.3, "300ms"),
    (3600.0, "1h"),
    (3605.0, "1h5s"),
    (3660.0, "1h1m"),
    (9900.0, "2h45m"),
    (3723.004, "1h2m3.004s"),
    (90.5, "1m30.5s"),
    (1.5e-6, "1.5\u00b5s"),
    (1e-9, "1ns"),
    (0.0015, "1.5ms"),
    (-90.0, "-1m30s"),
    (1e-12, "0s"),
    (1.000000001, "1.000000001s"),
]


@pytest.mark.parametrize(("seconds", "text"), FORMATTED)
def test_format(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("text", [GO_MAX, GO_MIN])
def test_format_go_limits(text):
    assert format_duration(parse_duration(text)) == text


@pytest.mark.parametrize(("text", "seconds"), VALID)
def test_format_round_trip(text, seconds):
    parsed = parse_duration(text)
    assert parse_duration(format_duration(parsed)) == parsed


def test_format_round_trip_many_values():
    values = [n / 7 for n in range(-50, 50)] + [10.0**exponent for exponent in range(-9, 9)]
    for value in values:
        parsed = parse_duration(value)
        assert parse_duration(format_duration(parsed)) == parsed, value


def test_format_nan():
    with pytest.raises(ValueError, match="finite"):
        format_duration(math.nan)


def test_seconds_to_nanoseconds_exact():
    assert seconds_to_nanoseconds(0.1) == 100_000_000
    assert seconds_to_nanoseconds(3) == 3_000_000_000
