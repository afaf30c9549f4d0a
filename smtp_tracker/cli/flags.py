"""Flags, the example file and the configuration reference, from :class:`Config`'s fields.

Each key's help is written once, in its field (:func:`smtp_tracker.config.key`);
this module presents it three ways:

- :func:`add_config_flags`: one flag per key, the key with dashes
  (``upstream_tls`` ↔ ``--upstream-tls``), ``--x``/``--no-x`` for a boolean;
- :func:`example_toml`: ``conf/smtp-tracker.toml``, every key commented out with
  its default (a test checks the file is this text);
- :func:`reference_markdown`: the docs site's configuration page.

To write the example file again after a key changes::

    python -c 'from smtp_tracker.cli import flags; print(flags.example_toml(), end="")' \
        > conf/smtp-tracker.toml
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any, get_args

from smtp_tracker.config import (
    PASSWORD_ENV,
    CaptureMode,
    Config,
    DkimPolicy,
    IpPolicy,
    LogFormat,
    LogLevel,
    PixelPosition,
    UpstreamTLS,
    config_from_sources,
)

__all__ = [
    "ALL_KEYS",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "add_command",
    "add_config_flags",
    "config_flags",
    "example_toml",
    "help_of",
    "load_config",
    "open_store",
    "reference_markdown",
]

#: Exit status of every command: success, a start-up or input failure, a
#: configuration or usage error (argparse's own status for bad flags).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

#: Keys that are never a flag nor a line of the file (the password: a secret).
_SECRET = frozenset({"upstream_password"})

#: Every key that has a flag, in the order of :class:`Config`.
ALL_KEYS: tuple[str, ...] = tuple(
    spec.name for spec in dataclasses.fields(Config) if spec.name not in _SECRET
)

_FIELDS = {spec.name: spec for spec in dataclasses.fields(Config)}

_CHOICES: dict[str, tuple[str, ...]] = {
    "UpstreamTLS": get_args(UpstreamTLS),
    "CaptureMode": get_args(CaptureMode),
    "IpPolicy": get_args(IpPolicy),
    "DkimPolicy": get_args(DkimPolicy),
    "PixelPosition": get_args(PixelPosition),
    "LogLevel": get_args(LogLevel),
    "LogFormat": get_args(LogFormat),
}


def help_of(name: str) -> str:
    """The help of key *name*, as written in its :class:`Config` field.

    :raises KeyError: when *name* is not a key.
    """
    return str(_FIELDS[name].metadata["help"])


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def units(name: str) -> str | None:
    """The unit a key's name carries (``_s`` seconds, ``_bytes``, ``_days``, ``_per_min``)."""
    for suffix, unit in (
        ("_s", "seconds"),
        ("_bytes", "bytes"),
        ("_days", "days"),
        ("_per_min", "per minute"),
    ):
        if name.endswith(suffix):
            return unit
    return None


def _metavar(name: str) -> str:
    kind = str(_FIELDS[name].type)
    if name.endswith("_s"):
        return "SECONDS"
    if name.endswith("_bytes"):
        return "BYTES"
    if name.endswith(("_per_min", "_days")) or kind == "int":
        return "N"
    if "HostPort" in kind:
        return "HOST:PORT"
    if "IPNetwork" in kind:
        return "CIDR[,CIDR...]"
    if name in {"tls_cert", "tls_key", "upstream_ca_file"}:
        return "PEM"
    if name == "data_dir":
        return "DIR"
    if "Path" in kind:
        return "FILE"
    if kind in _CHOICES:
        return "{" + ",".join(_CHOICES[kind]) + "}"
    if kind == "tuple[str, ...]":
        return "LIST"
    return name.upper().replace("_", "-").split("-")[-1]


def _type_text(name: str) -> str:
    kind = str(_FIELDS[name].type)
    if kind in _CHOICES:
        text = "one of " + ", ".join(f"`{choice}`" for choice in _CHOICES[kind])
    elif kind == "bool":
        text = "boolean"
    elif kind == "int":
        text = "integer"
    elif kind == "float":
        text = "number"
    elif "HostPort" in kind:
        text = '`"HOST:PORT"`'
    elif "IPNetwork" in kind:
        text = "list of CIDR networks"
    elif kind == "tuple[str, ...]":
        text = "list of strings"
    elif "Path" in kind:
        text = "path"
    else:
        text = "string"
    unit = units(name)
    return f"{text}, {unit}" if unit else text


def _default_value(name: str) -> Any:
    spec = _FIELDS[name]
    if spec.default is not dataclasses.MISSING:
        return spec.default
    return None  # computed at start (default_factory): described by default_text


def _plain(value: Any) -> str:
    """A value as one writes it on the command line."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value) if value else "none"
    return str(value)


def _toml(value: Any) -> str:
    """A value as one writes it in the TOML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    text = str(value)
    if "'" not in text and "\n" not in text and "\\" in text:
        return f"'{text}'"  # a literal string: a regular expression's backslashes as written
    return json.dumps(text, ensure_ascii=False)


def _default_text(name: str) -> str:
    """The default in words, for help texts and the reference."""
    described = _FIELDS[name].metadata.get("default_text")
    return str(described) if described else _plain(_default_value(name))


def add_config_flags(parser: argparse.ArgumentParser, keys: Iterable[str] = ALL_KEYS) -> None:
    """Add ``--config FILE`` and one flag per key of *keys* to *parser*.

    A flag not given leaves ``None`` in its destination (the key's name), so the
    file's value, else the default, applies (:func:`config_flags`).

    :raises KeyError: when a name of *keys* is not a key.
    """
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML configuration file (flags override it)"
    )
    group = parser.add_argument_group("configuration keys (each overrides the file)")
    for name in keys:
        text = f"{help_of(name)} (default: {_default_text(name)})".replace("%", "%%")
        if _FIELDS[name].type == "bool":
            group.add_argument(
                _flag(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=text,
            )
        else:
            group.add_argument(
                _flag(name), dest=name, default=None, metavar=_metavar(name), help=text
            )


def config_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The keys given as flags in *args*; ``None`` for a key not given or not a flag here."""
    return {name: getattr(args, name, None) for name in ALL_KEYS}


def load_config(args: argparse.Namespace, *, require_upstream: bool = False) -> Config:
    """The :class:`Config` of ``--config`` and the flags in *args*; warnings on stderr.

    :raises ConfigError: when the file is unreadable or a value is invalid.
    """
    warnings: list[str] = []
    config = config_from_sources(
        config_file=args.config,
        flags=config_flags(args),
        require_upstream=require_upstream,
        warnings=warnings,
    )
    for warning in warnings:
        print(f"smtp-tracker: warning: {warning}", file=sys.stderr)
    return config


def open_store(config: Config, **options: Any) -> Any:
    """The store of ``--store`` (PostgreSQL) or ``--data-dir`` (SQLite), blocking;
    *options* go to :func:`~smtp_tracker.store.backends.open_database`.

    :raises InputError: when there is no store there, or it cannot be opened.
    """
    from smtp_tracker.errors import InputError, StoreError
    from smtp_tracker.store.backends import is_postgresql, open_database

    try:
        return open_database(
            store=config.store,
            data_dir=config.data_dir,
            password_file=config.store_password_file,
            **options,
        )
    except StoreError as exc:
        where = "--store" if is_postgresql(config.store) else "--data-dir (or --config)"
        raise InputError(f"{exc}: give {where} of a running smtp-tracker") from None


def add_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    *,
    help: str,
    description: str,
) -> argparse.ArgumentParser:
    """A sub-command's parser; abbreviated flags are refused (``--store`` is not
    ``--store-subject``)."""
    return commands.add_parser(name, help=help, description=description, allow_abbrev=False)


# -- documents ------------------------------------------------------------------------

_TOML_HEADER = f"""\
# smtp-tracker configuration: every key, with its default.
# Each key can be overridden by the flag of the same name with dashes
# (upstream_tls -> --upstream-tls). Durations are in seconds (_s), sizes in bytes.
# The upstream password is never a key or a flag: set {PASSWORD_ENV}
# or upstream_password_file (a file of mode 0600).
#
# Generated from smtp_tracker/config.py (smtp_tracker.cli.flags.example_toml).
"""


def example_toml() -> str:
    """``conf/smtp-tracker.toml``: each key's help, then the key commented out with
    its default (or an example value, for a key without a default worth showing)."""
    lines = [_TOML_HEADER]
    for name in ALL_KEYS:
        metadata = _FIELDS[name].metadata
        if metadata.get("section"):
            lines.append(f"\n# --- {metadata['section']} ---")
        text = help_of(name)
        if metadata.get("default_text"):
            text += f" (default: {metadata['default_text']})"
        lines.extend(
            textwrap.wrap(
                text, width=86, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False
            )
        )
        example = metadata.get("example")
        value = example if example is not None else _toml(_default_value(name))
        lines.append(f"# {name} = {value}")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference_markdown() -> str:
    """The configuration reference, as a Markdown document body (no title).

    One section per group of keys, one table row per key: key, flag, type and
    units, default, what it does.  Generated from :class:`Config`'s fields, so it
    cannot drift from the code.
    """
    out = [
        "Every key below can be set in the TOML file given with `--config` "
        "(see `conf/smtp-tracker.toml`) or with its flag, which overrides the file. "
        "Durations are in seconds (`_s`), sizes in bytes (`_bytes`); numbers must be "
        "finite. A boolean key's flag has a `--no-` form. Lists are TOML arrays in the "
        "file and comma-separated as flags.",
        "",
        f"The upstream password is never a key nor a flag: set the environment variable "
        f"`{PASSWORD_ENV}`, or `upstream_password_file` (a file of mode 0600).",
    ]
    header = ["| Key | Flag | Type | Default | Description |", "|---|---|---|---|---|"]
    for name in ALL_KEYS:
        metadata = _FIELDS[name].metadata
        if metadata.get("section") or name == ALL_KEYS[0]:
            out.extend(["", f"## {metadata.get('section') or 'Keys'}", "", *header])
        if metadata.get("default_text"):
            default = _cell(str(metadata["default_text"]))
        else:
            default = f"`{_cell(_toml(_default_value(name)))}`"
            if _default_value(name) is None:
                default = "none"
        flag = f"`{_flag(name)}`"
        if _FIELDS[name].type == "bool":
            flag += f" / `--no-{_flag(name)[2:]}`"
        out.append(
            f"| `{name}` | {flag} | {_type_text(name)} | {default} | {_cell(help_of(name))} |"
        )
    return "\n".join(out) + "\n"
