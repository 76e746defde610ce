"""Privacy rule 8: replace e-mail addresses, phone numbers, payment cards and IPs.

`scrub(text, counts)` returns `text` with each detected item replaced by a
typed placeholder (`[EMAIL]`, `[PHONE]`, `[CARD]`, `[IP]`) and adds one to
`counts["email" | "phone" | "card" | "ip"]` per replacement.

It runs on every output text of a build (a million events must pass at
>= 50,000 events/s on 2 cores), so it is three compiled regexes, each run only
when the text holds the character its kind needs (`@`, `:`, a digit), and the
costlier checks (`ipaddress` for IPv6, Luhn) only on the few candidates they
find; a text with neither an ASCII digit nor `@` (most of them) is returned
after a single pass in C. About 1 us for a 400-character message without
digits, 10-15 us with ordinary numbers, dates and times, 40-50 us when it
holds PII (measured on this project's 2-core x86 build machine).

What is detected, and what is deliberately left alone:

- E-mail: `local@domain.tld`, ASCII only, local part of at most 64 characters
  (RFC 5321), TLD of 2-24 letters. Quoted local parts and non-ASCII domains
  are not detected.
- IPv6: full, compressed (`fe80::1`, `::1`) and IPv4-mapped/embedded forms
  (`::ffff:192.0.2.128`), checked by `ipaddress.IPv6Address`. A candidate must
  contain a decimal digit, so code such as `a::b` or `dead::beef` (valid hex,
  but far likelier a C++/Rust scope than an address) is left alone; so are
  Python slices of short decimal numbers (`0::2`, `::2`, `10::20`), except
  `::1`, which is read as the loopback (so a `x[::1]` slice is replaced), and
  times (`09:14:00`) and MAC addresses, which `ipaddress` rejects.
- IPv4: four dotted decimal octets of 0-255 without zero padding, the rule
  of `ipaddress.IPv4Address` (checked in the pattern itself, five times
  cheaper; the tests hold it to `ipaddress`). `999.1.1.1` is not an IP. Not
  part of a longer dotted run, so version strings (`1.2.3`, `1.2.3.4.5`,
  `v1.2.3.4`) stay, and so do four-part numbers that read as versions or
  section numbers: first octet below 10 and the others below 100
  (`3.6.11.1`, `1.6.12.99`; also `8.8.8.8` and `1.1.1.1`, public resolvers,
  not personal data). So about 6% of the addresses in 1.0.0.0-9.255.255.255
  (those with no octet of 100 or more after the first) are missed.
- Payment card: 13-19 digits, contiguous or in the printed groupings
  (4-4-4-4[-3], 4-4-4-1..4, Amex/Diners 4-6-5/4-6-4) with one kind of
  separator (space or dash), starting with 2-6 (the payment networks, from
  Mastercard's 2-series to Discover; this keeps zero-filled registers and
  other long numbers out), and Luhn-valid. A card-shaped run that fails Luhn
  is left alone *entirely*: the card pattern consumes it, so no part of it is
  then taken for a phone number. Not cards either: a contiguous run right
  after `-` or `/` (an identifier or URL part: `fuzzer-5390364397928448`), and
  five or more groups in a row (a table of numbers). A card directly preceded
  by another space-separated number (`1234 4111 1111 1111 1111`) is read as
  one longer run and missed.
- Phone: `+` international numbers of 7-15 digits (E.164 allows at most 15;
  a country code never starts with 0, so `+0200` time-zone offsets stay),
  with spaces, dots, dashes, a parenthesised area code or trunk `(0)`
  (`+14155552671`, `+44 20 7946 0958`, `+49 (0)30 123456`,
  `+33 1 23 45 67 89`, `+1 (415) 555-2671`); North-American national forms
  (`(415) 555-2671`, `415-555-2671`, `415.555.2671`, `415 555 2671`, with an
  optional leading `1`); and trunk-prefixed national forms starting with `0`
  of 9-12 digits (`020 7946 0958`, `01 23 45 67 89`, `030 123456`). Not
  detected, to keep ordinary numbers intact: bare digit runs without `+`
  (order numbers, Unix timestamps), 7-digit local numbers (`555-2671`),
  `00`-prefixed international numbers, the 5-4 shape of US ZIP+4 codes
  (`02110-1301`), numbers right after `/` (URL paths), and national forms
  followed by one more group in the same style (`571 612 1056 1100`, byte
  dumps), which read as one longer run.

Never touched: dates (`2026-10-02`, `02.10.2026`), times, ISO timestamps,
prices, decimals, small numbers, ids such as `A-1234`: none of them fits a
pattern above (dates have too few digits for the national phone forms).

Placeholders hold no digit, `@` or `:`, and `scrub` repeats its pass until
nothing changes, so scrubbing twice changes nothing further.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

EMAIL, PHONE, CARD, IP = "[EMAIL]", "[PHONE]", "[CARD]", "[IP]"

# Every pattern is ASCII: `\d` and `\w` must not match Arabic-Indic digits or
# letters of other scripts, or the boundaries below would mean something else.
#
# Speed: CPython's regex engine scans for a literal first character (`@`, `:`)
# about 10x faster than for a character class, and tries every alternative
# at every position when a pattern starts with a group. So e-mails and IPv6
# are found from their `@` / first `:` (the part before it is walked back in
# Python, a few characters), and the digit kinds share one pattern that
# starts with a single class, the "not inside a word" check right after it.

_LOCAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
_HEX_CHARS = frozenset("0123456789abcdefABCDEF")
_WORD_COLON_DOT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_:.")
_DIGITS = "0123456789"
NEEDED = b"0123456789@"  # a text with none of these bytes holds nothing to scrub (see `scrub`)

# "@domain.tld", not followed by more of a domain.
_EMAIL_DOMAIN_RE = re.compile(
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}"
    r"(?![A-Za-z0-9_-]|\.[A-Za-z0-9])",
    re.ASCII,
)

_IPV4_DOTTED = r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}"
# 0-255 without zero padding (as `ipaddress` reads it); _OCTET_REST is the rest
# of an octet whose first digit was already matched.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_OCTET_REST = r"(?:(?<=2)5[0-5]|(?<=2)[0-4][0-9]|(?<=1)[0-9][0-9]|(?<=[1-9])[0-9]|)"
# From the first colon of an IPv6 candidate (one not preceded by a colon): 1 to
# 6 more "group:" (empty groups make the `::`), then an embedded IPv4 or a last
# hex group; not followed by more of a word, colon run or dotted number.
_IPV6_FROM_COLON_RE = re.compile(
    rf":(?<!::)(?:[0-9A-Fa-f]{{0,4}}:){{1,6}}(?:{_IPV4_DOTTED}|[0-9A-Fa-f]{{1,4}})?"
    r"(?![\w:]|\.[0-9])",
    re.ASCII,
)

# Python slices (`x[0::2]`, `a[::2]`, `b[10::20]`) are valid compressed IPv6;
# real addresses this short are all but unheard of, except the loopback `::1`.
_SLICE_RE = re.compile(r"[0-9]{0,3}::[0-9]{0,3}", re.ASCII)

# The digit kinds share one pattern so that each span of digits is read once,
# by the first alternative that fits it: a span taken as a card (Luhn-valid or
# not) is never re-read as a phone number. The first character (digit, '+' or
# '(') is matched outside the alternatives, which assert which one it was; the
# span is `m.group()` and the kind `m.lastgroup`.
#
# IPv4: not inside a longer dotted run. Octets are range-checked here, so a
# span that is not an address (`01.00.00.000`) is free to be read as a phone
# number by the alternatives after it.
_IPV4_ALTERNATIVE = (
    rf"(?<=[0-9])(?<![.][0-9])(?P<ip4>{_OCTET_REST}(?:\.{_OCTET}){{3}})(?![\w]|\.[0-9])"
)
_CARD_AND_PHONE_ALTERNATIVES = [
    # Card, contiguous: not the fraction of a decimal, nor the tail of an
    # identifier (`fuzzer-5390364397928448`).
    r"(?<=[0-9])(?<![0-9][.,][0-9])(?<!-[0-9])(?P<card>[0-9]{12,18})(?![\w]|[.,][0-9])",
    # Card, grouped: neither the tail nor the head of a longer run of digit
    # groups (`1711 1728 1745 1763 1781`: a table, not a card).
    r"(?<=[0-9])(?<![0-9][ .,-][0-9])(?P<cardg>[0-9]{3}(?P<cs>[ -])"
    r"(?:[0-9]{4}(?P=cs)[0-9]{4}(?P=cs)[0-9]{1,4}(?:(?P=cs)[0-9]{3})?"
    r"|[0-9]{6}(?P=cs)[0-9]{4,5}))(?![\w]|[.,-][0-9]|(?P=cs)[0-9]{3})",
    # Phone, international: '+', digits, then up to 7 groups that each start
    # with a separator or a parenthesis. Groups never split a digit run, which
    # keeps backtracking linear on long digit strings.
    r"(?<=\+)(?P<intl>[1-9][0-9]{0,14}"
    r"(?:[ .-]?\([0-9]{1,5}\)[ .-]?[0-9]{1,15}|[ .-][0-9]{1,15}){0,7})"
    r"(?![\w]|[.,-]?[0-9])",
    # Phone, national with a parenthesised area code, optional leading 1.
    r"(?<![0-9][ .,-][(1])(?P<area>(?:(?<=1)[ .-]?\(|(?<=\())"
    r"[0-9]{2,5}\)[ .-]?[0-9]{3,4}[ .-]?[0-9]{2,4}(?:[ .-]?[0-9]{2,4})?)"
    r"(?![\w]|[.,-]?[0-9])",
    # Phone, North-American 3-3-4 with one kind of separator, optional 1;
    # not followed by another group (`571 612 1056 1100` is a list).
    r"(?<=[0-9])(?<![0-9][ .,-][0-9])"
    r"(?P<nanp>(?:(?<=1)[ .-][0-9]{3}|[0-9]{2})(?P<ns>[ .-])[0-9]{3}(?P=ns)[0-9]{4})"
    r"(?![\w]|[.,-]?[0-9]|(?P=ns)[0-9])",
    # Phone, national with trunk prefix 0 and one kind of separator; not
    # followed by another group (`08 07 06 05 04 03 02 01` is a byte dump).
    r"(?<=0)(?<![0-9][ .,-]0)(?P<trunk>[0-9]{1,4}(?P<ts>[ .-])[0-9]{2,8}"
    r"(?:(?P=ts)[0-9]{2,4}){0,4})(?![\w]|[.,-]?[0-9]|(?P=ts)[0-9])",
]
# Every alternative needs, right after its first character, a digit after '+',
# or up to 5 digits, a separator and a digit, or 12 digits: checking that first
# turns away most ordinary numbers (`3 items`, `09:14`) 25% faster.
_NUMERIC_PREFILTER = r"(?=(?<=\+)[1-9]|[0-9]{0,5}[ .()-]{1,2}[0-9]|[0-9]{12})"
_NUMERIC_RE = re.compile(
    # Not inside a word or after '+'. Cards and phones also not right after
    # '/' (URL paths, where long digit runs are ids); IPs are (`http://1.2.3.4`).
    rf"[0-9+(](?<![\w+][0-9+(]){_NUMERIC_PREFILTER}(?:{_IPV4_ALTERNATIVE}"
    rf"|(?<!/[0-9+(])(?:{'|'.join(_CARD_AND_PHONE_ALTERNATIVES)}))",
    re.ASCII,
)


_LUHN_DOUBLED = str.maketrans("0123456789", "0246813579")  # 2d, minus 9 above 9


def luhn_valid(digits: str) -> bool:
    """True if the decimal string `digits` passes the Luhn checksum.

    From the right, every second digit is doubled (minus 9 when above 9); the
    sum must be a multiple of 10. `"79927398713"` is valid: 3 + (1->2) + 7 +
    (8->7) + 9 + (3->6) + 7 + (2->4) + 9 + (9->9) + 7 = 70.
    """
    rev = digits[::-1]
    return (sum(map(int, rev[0::2])) + sum(map(int, rev[1::2].translate(_LUHN_DOUBLED)))) % 10 == 0


def scrub(text: str, counts: Counter) -> str:
    """Return `text` with PII replaced by placeholders, counting each in `counts`.

    See the module docstring for exactly what is detected. Never raises on any
    string; `counts` is updated in place (keys "email", "phone", "card", "ip").
    """
    # The common case, a text without PII, costs one pass in C: every kind
    # needs an ASCII digit (phones, cards, IPv4, and IPv6 as detected here) or
    # an "@" (e-mail). A quarter of the time of testing each character alone.
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw.translate(None, NEEDED)) == len(raw):
        return text
    before = sum(counts.values())
    text = _scrub_once(text, counts)
    # A placeholder can unshield a neighbour that the replaced digits were
    # hiding (`+1000000+1000000`, or a number after a card, which reads as the
    # card's continuation), so scrub again until nothing changes: that makes
    # scrub idempotent. Each pass that replaces something removes digits, `@`
    # or `:`, so this ends; text without PII pays a single pass.
    while (after := sum(counts.values())) != before:
        before = after
        text = _scrub_once(text, counts)
    return text


def _scrub_once(text: str, counts: Counter) -> str:
    if "@" in text:
        text = _scrub_emails(text, counts)
    if "::" in text or text.count(":") >= 2:
        text = _scrub_ipv6(text, counts)
    if any(map(text.__contains__, _DIGITS)):
        text = _NUMERIC_RE.sub(lambda m: _replace_numeric(m, counts), text)
    return text


def _scrub_emails(text: str, counts: Counter) -> str:
    pieces, last = [], 0
    for m in _EMAIL_DOMAIN_RE.finditer(text):
        at = start = m.start()
        # The local part: at most 64 characters (RFC 5321), starting a token.
        stop = max(last, at - 64)
        while start > stop and text[start - 1] in _LOCAL_CHARS:
            start -= 1
        if start == at or (start > 0 and text[start - 1] in _LOCAL_CHARS):
            continue
        pieces += (text[last:start], EMAIL)
        last = m.end()
        counts["email"] += 1
    return "".join(pieces) + text[last:] if pieces else text


def _scrub_ipv6(text: str, counts: Counter) -> str:
    pieces, last = [], 0
    for m in _IPV6_FROM_COLON_RE.finditer(text):
        # The first group: up to 4 hex digits before the first colon, which
        # must start a token (not continue a word, colon or dotted run).
        start = m.start()
        stop = max(last, start - 4)
        while start > stop and text[start - 1] in _HEX_CHARS:
            start -= 1
        if start > 0 and text[start - 1] in _WORD_COLON_DOT:
            continue
        candidate = text[start : m.end()]
        # `a::b` is valid hex but reads as code; real addresses carry a digit.
        # Without `::` an address has 8 groups (7 colons) or 6 and an IPv4
        # (6 colons): this skips times and MACs before the costlier parse.
        if not any(map(candidate.__contains__, _DIGITS)) or (
            "::" not in candidate and candidate.count(":") not in (6, 7)
        ):
            continue
        if candidate != "::1" and _SLICE_RE.fullmatch(candidate):
            continue
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        pieces += (text[last:start], IP)
        last = m.end()
        counts["ip"] += 1
    return "".join(pieces) + text[last:] if pieces else text


_ZIP4_RE = re.compile(r"0[0-9]{4}-[0-9]{4}", re.ASCII)


def _digits_only(span: str) -> str:
    # str.replace runs in C; a generator over characters is 5x slower here.
    for sep in " .-()+":
        span = span.replace(sep, "")
    return span


def _classify_numeric(m: re.Match) -> str | None:
    """The counter key for a numeric candidate, or None to leave it as it is."""
    kind, span = m.lastgroup, m.group()
    if kind == "ip4":  # octets already range-checked by the pattern
        first, *rest = map(int, span.split("."))
        # `3.6.11.1`, `1.6.12.99`: versions and section numbers, not addresses.
        return None if first < 10 and max(rest) < 100 else "ip"
    if kind == "trunk" and _ZIP4_RE.fullmatch(span):  # `02110-1301`: a US ZIP+4 code
        return None
    n = len(digits := _digits_only(span))
    if kind in ("card", "cardg"):  # payment cards start with 2-6 (Mastercard .. Discover)
        return "card" if 13 <= n <= 19 and digits[0] in "23456" and luhn_valid(digits) else None
    if kind == "intl":  # E.164: at most 15 digits
        return "phone" if 7 <= n <= 15 else None
    if kind == "trunk":  # fewer digits would take in dates like 01.02.2026
        return "phone" if 9 <= n <= 12 else None
    return "phone" if 7 <= n <= 12 else None  # area, nanp


_PLACEHOLDER = {"ip": IP, "card": CARD, "phone": PHONE}


def _replace_numeric(m: re.Match, counts: Counter) -> str:
    kind = _classify_numeric(m)
    if kind is None:
        return m.group()
    counts[kind] += 1
    return _PLACEHOLDER[kind]
