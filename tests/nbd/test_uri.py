from __future__ import annotations

import pytest

from nbdluks.nbd.uri import NbdUri, UriError, parse_uri


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nbd://example.com", NbdUri("", "example.com", 10809)),
        ("nbd://example.com:10810/disk", NbdUri("disk", "example.com", 10810)),
        ("nbd://[::1]:10809/a%20b", NbdUri("a b", "::1", 10809)),
        ("nbd+unix:///?socket=/run/s.sock", NbdUri("", socket="/run/s.sock")),
        ("nbd+unix:///vol7?socket=/tmp/x.sock", NbdUri("vol7", socket="/tmp/x.sock")),
        ("nbds://h/e?tls-certificates=/pki", NbdUri("e", "h", tls=True, tls_certificates="/pki")),
        ("nbds+unix:///?socket=/s&tls-verify-peer=false&tls-hostname=srv",
         NbdUri("", socket="/s", tls=True, tls_verify=False, tls_hostname="srv")),
    ],
)
def test_parse(text: str, expected: NbdUri) -> None:
    assert parse_uri(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nbd://host/x?tls-certificates=/pki", "need nbds"),
        ("nbds://host/x?tls-verify-peer=maybe", "true or false"),
        ("http://host/", "not an NBD URI"),
        ("nbd+unix:///x", "socket="),
        ("nbd+unix://host/x?socket=/s", "no host"),
        ("nbd:///x", "no host"),
        ("nbd://host:99999/x", "bad port"),
    ],
)
def test_errors(text: str, message: str) -> None:
    with pytest.raises(UriError, match=message):
        parse_uri(text)


def test_str_round_trip() -> None:
    for text in ("nbd+unix:///vol?socket=/tmp/x.sock", "nbd://h:10809/e", "nbd://[::1]:1/e",
                 "nbds://h:1/e"):
        assert parse_uri(str(parse_uri(text))) == parse_uri(text)
