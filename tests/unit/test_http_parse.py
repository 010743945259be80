"""The status page's request parser refuses odd shapes with a 400, never a traceback (issue 16)."""

from __future__ import annotations

import logging

import pytest
from cluster.runtime.http import BadRequest, parse_head

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("head", [
    "GET / HTTP/1.1\r\nContent-Length: \u00b2\r\n",
    "GET //[ HTTP/1.1\r\n",
    "GET / HTTP/1.1\r\nContent-Length: 1\r\n",
])
def test_odd_requests_are_bad_requests(head):
    with pytest.raises(BadRequest) as info:
        parse_head(head.encode())
    assert info.value.status == 400


def test_plain_request_parses():
    request = parse_head(b"GET /status?token=x HTTP/1.1\r\nContent-Length: 0\r\n")
    assert request.path == "/status" and request.query == {"token": "x"}


def test_security_false_warns_once(caplog):
    from cluster.runtime import local

    local._warned_no_tls = False
    with caplog.at_level(logging.WARNING, logger="cluster.runtime.local"):
        local._warn_no_tls_once()
        local._warn_no_tls_once()
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "run code as you" in caplog.records[0].getMessage()
