"""The OpenAPI 3.1 description of the reports JSON API, served at ``/api/openapi.json``.

Written by hand beside :mod:`smtp_tracker.web.reports.api`; a test validates it
with ``openapi-spec-validator`` and checks every route of the app is in it.
"""

from __future__ import annotations

from typing import Any, Final

from smtp_tracker import __version__
from smtp_tracker.store.queries import DEFAULT_LIMIT, DKIM_OUTCOMES, MAX_LIMIT, VERDICTS

__all__ = ["OPENAPI"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _param(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


_NULLABLE_STRING: Final = {"type": ["string", "null"]}
_NULLABLE_TIME: Final = {"type": ["string", "null"], "format": "date-time"}
_DATE_OR_TIME: Final = {
    "type": "string",
    "description": "An ISO 8601 date (2024-05-01) or date-time (2024-05-01T12:00:00Z); "
    "UTC when it has no offset.",
}
_BOOLEAN_TEXT: Final = {"type": "string", "enum": ["true", "false"]}

_FILTER_PARAMETERS: Final = [
    _param("sender", "The reverse-path exactly as recorded; `<>` for bounces.", {"type": "string"}),
    _param("sender_domain", "The reverse-path's domain (case-insensitive).", {"type": "string"}),
    _param("recipient", "One forward-path (case-insensitive).", {"type": "string"}),
    _param(
        "q",
        "A tracking id, queue id or Message-ID (with or without angle brackets), exact.",
        {"type": "string"},
    ),
    _param("since", "Relayed at or after (a date: from its start, UTC).", _DATE_OR_TIME),
    _param(
        "until",
        "Relayed before this date-time; a date includes that whole day (UTC).",
        _DATE_OR_TIME,
    ),
    _param(
        "opened",
        "true: opened (a counted open, human or mail_proxy, or failing that a counted "
        "click); false: neither.",
        _BOOLEAN_TEXT,
    ),
    _param("tracked", "Whether a pixel was injected.", _BOOLEAN_TEXT),
]

_ERROR_RESPONSE: Final = {
    "description": "An error, explained in one line.",
    "content": {"application/json": {"schema": _ref("Error")}},
}
_UNAUTHORIZED: Final = {
    "description": "No or a wrong bearer token.",
    "content": {"application/json": {"schema": _ref("Error")}},
}

_VERDICT: Final = {
    "type": "string",
    "enum": list(VERDICTS),
    "description": "How the event was classified; human and mail_proxy are counted as opens.",
}

_SUMMARY_PROPERTIES: Final[dict[str, Any]] = {
    "tracking_id": {"type": "string", "description": "The pixel token; the message's id."},
    "queue_id": {"type": "string", "description": "smtp-tracker's queue id."},
    "message_id": {**_NULLABLE_STRING, "description": "The Message-ID header as found."},
    "sender": {"type": "string", "description": "The reverse-path; empty for bounces."},
    "recipients": {"type": "array", "items": {"type": "string"}},
    "subject": {**_NULLABLE_STRING, "description": "Only when store_subject is on."},
    "relayed_at": {"type": "string", "format": "date-time"},
    "tracked": {"type": "boolean"},
    "not_tracked_reason": _NULLABLE_STRING,
    "dkim": {
        **_NULLABLE_STRING,
        "description": "What became of the message's DKIM signatures (dkim_policy): resigned, "
        "or why it was relayed as received (dkim-signed, dkim-invalid, dkim-foreign, "
        "dkim-length-tag, arc-sealed, dkim-resign-failed); null when it had none.",
    },
    "opened": {
        "type": "boolean",
        "description": "At least one counted open, or a counted click (a link followed by a "
        "person means the message was read, its pixel not fetched).",
    },
    "opened_via": {
        "type": ["string", "null"],
        "enum": ["pixel", "click", None],
        "description": "pixel: a counted open; click: a counted click and no counted open; "
        "null: not opened.",
    },
    "open_count": {"type": "integer", "minimum": 0, "description": "Opens of any verdict."},
    "counted_open_count": {
        "type": "integer",
        "minimum": 0,
        "description": "Opens with a counted verdict (human, mail_proxy).",
    },
    "first_open_at": {**_NULLABLE_TIME, "description": "The first counted open."},
    "click_count": {"type": "integer", "minimum": 0},
    "counted_click_count": {"type": "integer", "minimum": 0},
}

_EVENT_PROPERTIES: Final[dict[str, Any]] = {
    "at": {"type": "string", "format": "date-time"},
    "ip": {
        **_NULLABLE_STRING,
        "description": "The client address as ip_policy kept it (address, network, hash or null).",
    },
    "user_agent": _NULLABLE_STRING,
    "verdict": _VERDICT,
    "verdict_reason": _NULLABLE_STRING,
    "counted": {"type": "boolean"},
}

_STATS_PROPERTIES: Final[dict[str, Any]] = {
    "key": {
        "type": "string",
        "description": "The UTC relay day (YYYY-MM-DD), the sender domain, or 'total'.",
    },
    "relayed": {"type": "integer", "minimum": 0},
    "tracked": {"type": "integer", "minimum": 0},
    "opened": {
        "type": "integer",
        "minimum": 0,
        "description": "Messages opened: at least one counted open (human, mail_proxy), or a "
        "counted click and no counted open (see opened_via_click).",
    },
    "opened_any": {
        "type": "integer",
        "minimum": 0,
        "description": "Messages with at least one open of any verdict.",
    },
    "opens": {"type": "integer", "minimum": 0, "description": "Open events of any verdict."},
    "opens_by_verdict": {
        "type": "object",
        "properties": {v: {"type": "integer", "minimum": 0} for v in VERDICTS},
        "required": list(VERDICTS),
        "additionalProperties": False,
    },
    "clicks": {"type": "integer", "minimum": 0},
    "clicked": {"type": "integer", "minimum": 0},
    "opened_via_click": {
        "type": "integer",
        "minimum": 0,
        "description": "Of opened, the messages opened by a counted click alone.",
    },
    "open_rate": {
        "type": ["number", "null"],
        "minimum": 0,
        "maximum": 1,
        "description": "opened / tracked; null when nothing was tracked.",
    },
    "relayed_aggregate": {
        "type": "integer",
        "minimum": 0,
        "description": "Of relayed, the messages recorded with tracking_mode = aggregate "
        "(counts only, nothing tied to a person).",
    },
    "tracking_mode": {
        "type": "string",
        "enum": ["per-person", "aggregate", "mixed"],
        "description": "Which tracking_mode produced these figures (mixed: it changed "
        "within them).",
    },
    "dkim": {
        "type": "object",
        "properties": {o: {"type": "integer", "minimum": 0} for o in DKIM_OUTCOMES},
        "required": list(DKIM_OUTCOMES),
        "additionalProperties": {"type": "integer", "minimum": 0},
        "description": "Of relayed, the DKIM-signed messages per outcome (dkim_policy): "
        "resigned (tracked and re-signed), or the reason one was relayed as received.",
    },
}

#: The OpenAPI 3.1 document (a JSON-ready dict).
OPENAPI: Final[dict[str, Any]] = {
    "openapi": "3.1.0",
    "info": {
        "title": "smtp-tracker reports",
        "version": __version__,
        "description": "Who opened what: messages relayed by smtp-tracker, their opens and "
        "clicks (each classified by verdict), and figures per day or sender domain. Days "
        "are UTC calendar days of the relay time. Every route needs "
        "`Authorization: Bearer <token>` with the token in reports_token_file.",
    },
    "security": [{"bearer": []}],
    "paths": {
        "/api/messages": {
            "get": {
                "operationId": "listMessages",
                "summary": "Messages, newest first, one page at a time.",
                "parameters": [
                    *_FILTER_PARAMETERS,
                    _param(
                        "limit",
                        "Messages per page.",
                        {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_LIMIT,
                            "default": DEFAULT_LIMIT,
                        },
                    ),
                    _param(
                        "cursor",
                        "next_cursor of the previous page, with the same filters.",
                        {"type": "string"},
                    ),
                ],
                "responses": {
                    "200": {
                        "description": "One page.",
                        "content": {"application/json": {"schema": _ref("MessagePage")}},
                    },
                    "400": _ERROR_RESPONSE,
                    "401": _UNAUTHORIZED,
                },
            }
        },
        "/api/messages/{id}": {
            "get": {
                "operationId": "getMessage",
                "summary": "One message with its opens and clicks, oldest first.",
                "parameters": [
                    {
                        "name": "id",
                        "in": "path",
                        "required": True,
                        "description": "Tracking id, else queue id, else Message-ID.",
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "The message.",
                        "content": {"application/json": {"schema": _ref("MessageDetail")}},
                    },
                    "401": _UNAUTHORIZED,
                    "404": _ERROR_RESPONSE,
                },
            }
        },
        "/api/stats": {
            "get": {
                "operationId": "getStats",
                "summary": "Figures per UTC relay day or per sender domain.",
                "parameters": [
                    _param(
                        "since",
                        "First relay day (UTC), included.",
                        {"type": "string", "format": "date"},
                    ),
                    _param(
                        "until",
                        "Last relay day (UTC), included.",
                        {"type": "string", "format": "date"},
                    ),
                    _param(
                        "group",
                        "One row per day (oldest first) or per sender domain (most relayed first).",
                        {"type": "string", "enum": ["day", "sender_domain"], "default": "day"},
                    ),
                ],
                "responses": {
                    "200": {
                        "description": "The rows and their total.",
                        "content": {"application/json": {"schema": _ref("Stats")}},
                    },
                    "400": _ERROR_RESPONSE,
                    "401": _UNAUTHORIZED,
                },
            }
        },
        "/api/export.csv": {
            "get": {
                "operationId": "exportMessages",
                "summary": "The messages the filters select, as CSV (RFC 4180), streamed.",
                "description": "A header row, then one row per message, newest first; "
                "recipients separated by spaces; cells that a spreadsheet would run as a "
                "formula are prefixed with an apostrophe.",
                "parameters": _FILTER_PARAMETERS,
                "responses": {
                    "200": {
                        "description": "The CSV file.",
                        "content": {"text/csv": {"schema": {"type": "string"}}},
                    },
                    "400": _ERROR_RESPONSE,
                    "401": _UNAUTHORIZED,
                },
            }
        },
        "/api/openapi.json": {
            "get": {
                "operationId": "getOpenApi",
                "summary": "This document.",
                "responses": {
                    "200": {
                        "description": "The OpenAPI 3.1 description.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "401": _UNAUTHORIZED,
                },
            }
        },
    },
    "components": {
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "The token in reports_token_file (DATA_DIR/reports-token).",
            }
        },
        "schemas": {
            "Error": {
                "type": "object",
                "properties": {"error": {"type": "string"}},
                "required": ["error"],
            },
            "MessageSummary": {
                "type": "object",
                "properties": _SUMMARY_PROPERTIES,
                "required": list(_SUMMARY_PROPERTIES),
            },
            "MessagePage": {
                "type": "object",
                "properties": {
                    "items": {"type": "array", "items": _ref("MessageSummary")},
                    "next_cursor": {
                        **_NULLABLE_STRING,
                        "description": "Give it as cursor for the next page; null on the last.",
                    },
                },
                "required": ["items", "next_cursor"],
            },
            "Open": {
                "type": "object",
                "properties": _EVENT_PROPERTIES,
                "required": list(_EVENT_PROPERTIES),
            },
            "Click": {
                "type": "object",
                "properties": {**_EVENT_PROPERTIES, "url": {"type": "string"}},
                "required": [*_EVENT_PROPERTIES, "url"],
            },
            "MessageDetail": {
                "allOf": [
                    _ref("MessageSummary"),
                    {
                        "type": "object",
                        "properties": {
                            "size_bytes": {"type": "integer", "minimum": 0},
                            "received_at": {"type": "string", "format": "date-time"},
                            "upstream_reply": {"type": "string"},
                            "opens": {"type": "array", "items": _ref("Open")},
                            "clicks": {"type": "array", "items": _ref("Click")},
                        },
                        "required": [
                            "size_bytes",
                            "received_at",
                            "upstream_reply",
                            "opens",
                            "clicks",
                        ],
                    },
                ]
            },
            "StatsRow": {
                "type": "object",
                "properties": _STATS_PROPERTIES,
                "required": list(_STATS_PROPERTIES),
            },
            "Stats": {
                "type": "object",
                "properties": {
                    "group": {"type": "string", "enum": ["day", "sender_domain"]},
                    "since": {"type": ["string", "null"], "format": "date"},
                    "until": {"type": ["string", "null"], "format": "date"},
                    "rows": {"type": "array", "items": _ref("StatsRow")},
                    "total": _ref("StatsRow"),
                },
                "required": ["group", "since", "until", "rows", "total"],
            },
        },
    },
}
