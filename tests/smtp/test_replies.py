"""Upstream replies are passed on with their code, enhanced status code and text."""

from smtp_tracker.smtp import replies, server
from smtp_tracker.smtp.replies import Reply


def test_enhanced_status_and_text_are_kept() -> None:
    reply = Reply.from_upstream(250, "2.0.0 Ok: queued as 4XyZ", command="DATA")
    assert str(reply) == "250 2.0.0 Ok: queued as 4XyZ"
    assert reply.is_positive


def test_missing_enhanced_status_is_supplied_per_command() -> None:
    assert str(Reply.from_upstream(250, "OK", command="MAIL")) == "250 2.1.0 OK"
    assert str(Reply.from_upstream(550, "no such user", command="RCPT")) == "550 5.1.5 no such user"
    assert str(Reply.from_upstream(451, "later", command="DATA")) == "451 4.0.0 later"


def test_enhanced_status_of_another_class_is_not_trusted() -> None:
    reply = Reply.from_upstream(550, "2.0.0 odd server", command="RCPT")
    assert reply.enhanced_status == "5.1.5"
    assert reply.text == "odd server"


def test_multiline_reply_becomes_one_line() -> None:
    reply = Reply.from_upstream(
        550, "5.7.1 Message rejected\n5.7.1 see https://example.net/why", command="DATA"
    )
    assert str(reply) == "550 5.7.1 Message rejected see https://example.net/why"


def test_unprintable_and_overlong_text_is_tamed() -> None:
    reply = Reply.from_upstream(250, "2.0.0 " + "x\x00\x1b" * 400, command="DATA")
    assert "\x00" not in reply.text and "\x1b" not in reply.text
    assert len(str(reply)) <= 512 - 2  # RFC 5321 §4.5.3.1.5, CRLF excluded


def test_421_and_5xx_made_transient_keep_the_detail() -> None:
    assert str(Reply.from_upstream(421, "4.3.2 shutting down", command="MAIL").as_transient()) == (
        "451 4.3.2 shutting down"
    )
    assert str(Reply.from_upstream(535, "5.7.8 bad creds", command="AUTH").as_transient()) == (
        "451 4.7.8 bad creds"
    )
    same = Reply.from_upstream(452, "4.5.3 too many", command="RCPT")
    assert same.as_transient() is same


def test_every_reply_we_compose_is_a_constant_with_a_matching_enhanced_status() -> None:
    """RFC 2034 §3 and RFC 3463 §2: the enhanced status class is the reply's class;
    each constant's name starts with its code; one line within 512 octets."""
    constants = {
        name: getattr(replies, name) for name in replies.__all__ if name[:2] in {"R2", "R4", "R5"}
    }
    assert len(constants) >= 50
    for name, reply in constants.items():
        assert isinstance(reply, Reply), name
        assert name.startswith(f"R{reply.code}_"), name
        klass, subject, detail = reply.enhanced_status.split(".")
        assert int(klass) == reply.code // 100, name
        assert subject.isdigit() and detail.isdigit(), name
        line = str(reply)
        assert line.isprintable() and len(line.encode()) <= 510, name


def test_aiosmtpds_own_replies_get_enhanced_status_codes() -> None:
    """Each aiosmtpd reply the protocol rewrites maps to one of our constants."""
    for stock, ours in server._STOCK_REPLIES.items():
        assert ours.code == int(stock[:3]), stock
        assert ours in vars(replies).values(), stock


def test_the_log_lines_tracking_part_is_one_text_for_smtp_and_lmtp() -> None:
    """handler._finish and LMTP's per-recipient line both write it (issue 13: the
    log line shows the DKIM outcome, LMTP's included)."""
    from smtp_tracker.smtp.handler import Prepared, tracking_text

    assert tracking_text(None) == ""
    assert tracking_text(Prepared(b"x")) == ""
    assert tracking_text(Prepared(b"x", tracking_id="t", tracked=True)) == ", tracked=yes"
    assert (
        tracking_text(Prepared(b"x", tracking_id="t", reason="dkim-foreign", dkim="dkim-foreign"))
        == ", tracked=no (dkim-foreign), dkim=dkim-foreign"
    )
    assert (
        tracking_text(Prepared(b"x", tracking_id="t", tracked=True, dkim="resigned"))
        == ", tracked=yes, dkim=resigned"
    )
