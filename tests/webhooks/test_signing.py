"""Standard Webhooks signatures: the specification's test vector, and the
``standardwebhooks`` library verifying what we sign."""

from __future__ import annotations

import base64
import time
import uuid
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from smtp_tracker.webhooks.events import new_event_id
from smtp_tracker.webhooks.signing import (
    new_secret,
    secret_key,
    signature_headers,
    signed_content_signature,
)

# The specification's example (standard-webhooks, spec/standard-webhooks.md, "Signature scheme").
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_the_specification_test_vector() -> None:
    key = secret_key(SPEC_SECRET)
    assert signed_content_signature(key, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE
    signed_at = datetime.fromtimestamp(SPEC_TIMESTAMP, UTC)
    assert Webhook(SPEC_SECRET).sign(SPEC_ID, signed_at, SPEC_BODY.decode()) == SPEC_SIGNATURE


def test_the_library_verifies_our_headers_and_refuses_a_change() -> None:
    secret = new_secret()
    body = b'{"id":"x","type":"message.opened"}'
    event_id = new_event_id()
    headers = signature_headers(secret_key(secret), event_id, int(time.time()), body)
    assert Webhook(secret).verify(body, headers) == {"id": "x", "type": "message.opened"}
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace(b"opened", b"closed"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, {**headers, "webhook-id": new_event_id()})
    # signed an hour ago: outside the library's five-minute tolerance (replay)
    old = signature_headers(secret_key(secret), event_id, int(time.time()) - 3600, body)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, old)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "starts with whsec_"),
        ("whsec_not base64!", "followed by base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "24 to 64 bytes"),
    ],
)
def test_a_bad_secret_says_why_without_echoing_it(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as caught:
        secret_key(text)
    assert text not in str(caught.value)


def test_event_ids_are_uuid7_and_sort_by_time() -> None:
    earlier = new_event_id(now_ns=1_700_000_000_000_000_000)
    later = new_event_id(now_ns=1_700_000_000_001_000_000)
    for text in (earlier, later):
        value = uuid.UUID(text)
        assert value.version == 7 and value.variant == uuid.RFC_4122
    assert earlier < later
    assert int(earlier.replace("-", "")[:12], 16) == 1_700_000_000_000  # Unix milliseconds
    assert len({new_event_id() for _ in range(1000)}) == 1000
