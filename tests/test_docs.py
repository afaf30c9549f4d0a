"""The README is the front door and docs/ the reference: both stay true.

The README stays short, its test command is the one CI runs, its links reach
pages of the site; every page is in mkdocs.yml's navigation and the site
builds with ``mkdocs build --strict`` (the configuration page generated from
the Config fields: every key documented); the files and tests the pages name
exist, and the ``smtp-tracker`` commands they show are ones the command line
takes; the reference sections moved out of the README stay in docs/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml
from markdown.extensions.toc import slugify
from mkdocs.exceptions import PluginError

from smtp_tracker.cli import _parser
from smtp_tracker.config import Config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
HOOK = DOCS / "hooks" / "config_reference.py"

#: The README's limit: the front door, not the reference (issue 11: "about 200 lines").
README_MAX_LINES = 250

#: Sections that lived in the README and now live in docs/: heading -> page.
MOVED_SECTIONS = {
    "The configuration file and flags": "configuration.md",
    "Upstream AUTH": "configuration.md",
    "Start-up errors": "configuration.md",
    "Reference": "configuration.md",
    "What Postfix sees, in step with the upstream": "postfix.md",
    "Per-recipient tracking": "postfix.md",
    "Trying it with swaks": "postfix.md",
    "The pixel": "tracking.md",
    "What is never touched": "tracking.md",
    "Click tracking": "tracking.md",
    "The pixel endpoint and the data directory": "tracking.md",
    "Trying it out": "tracking.md",
    "How opens are counted": "counting.md",
    "Verdicts": "counting.md",
    "Network lists": "counting.md",
    "Rate limits": "counting.md",
    "The reports listener": "reports.md",
    "The dashboard": "reports.md",
    "The JSON API": "reports.md",
    "`smtp-tracker stats`": "reports.md",
    "Privacy controls": "privacy.md",
    "Whose mail is tracked: domain lists": "privacy.md",
    "Saying so: disclosure footer and header": "privacy.md",
    "How long records are kept: `retention_days`": "privacy.md",
    "Erasing a person: `smtp-tracker forget`": "privacy.md",
    "Logs": "debugging.md",
    "Debug capture files": "debugging.md",
    "Reliability: what we guarantee": "reliability.md",
    "Security review checklist": "security.md",
    "Limits on the SMTP side": "security.md",
    "Smuggling": "security.md",
    "Benchmarks": "benchmarks.md",
    "Fuzzing": "fuzzing.md",
    "Run the tests": "development.md",
    "Refreshing the lock file": "upgrading.md",
    "The layering rule": "architecture.md",
}

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_PATH = re.compile(r"(?<![\w/.-])((?:smtp_tracker|tests|bench|fuzz|conf)/[\w./-]*\w\.\w+)")
_TEST_REF = re.compile(r"(?<![\w/.-])((?:tests/[\w/]+\.py)?)::(test_\w+)")


def _pages() -> set[str]:
    """Every Markdown page under docs/, relative to it (the hooks are code)."""
    return {
        p.relative_to(DOCS).as_posix()
        for p in DOCS.rglob("*.md")
        if p.relative_to(DOCS).parts[0] != "hooks"
    }


def _nav_pages(entries: Any) -> list[str]:
    found: list[str] = []
    if isinstance(entries, str):
        found.append(entries)
    elif isinstance(entries, list):
        for entry in entries:
            found.extend(_nav_pages(entry))
    elif isinstance(entries, dict):
        for value in entries.values():
            found.extend(_nav_pages(value))
    return found


def _headings(text: str) -> list[str]:
    """The Markdown headings of *text*, fenced code left out."""
    headings = []
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6} (.+)", line)):
            headings.append(match.group(1).strip())
    return headings


def _anchor(heading: str) -> str:
    """The id MkDocs's toc extension gives *heading* (its text without markup)."""
    return str(slugify(re.sub(r"[`*_]", "", heading), "-"))


def _install_and_test(text: str, where: str) -> list[str]:
    """The one ``pip install ... && pytest`` line of *text*, from ``pip`` on, as
    words, without pip's ``-q``/``--quiet`` (output only, not what is installed)."""
    lines = [line for line in text.splitlines() if "pip install" in line and "pytest" in line]
    assert len(lines) == 1, f"{where}: one 'pip install ... && pytest' line, found {lines}"
    command = lines[0][lines[0].index("pip install") :]
    return [word for word in shlex.split(command) if word not in ("-q", "--quiet")]


def test_the_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): "
        "move reference material to docs/"
    )


def test_every_page_is_in_the_nav_and_every_nav_entry_is_a_page() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = _nav_pages(config["nav"])
    assert len(nav) == len(set(nav)), f"a page is in the nav twice: {sorted(nav)}"
    assert set(nav) == _pages()


def test_the_readme_test_command_is_what_ci_runs() -> None:
    readme = _install_and_test(README.read_text(encoding="utf-8"), "README.md")
    ci = _install_and_test((ROOT / ".ci" / "run").read_text(encoding="utf-8"), ".ci/run")
    assert readme == ci
    assert "requirements/lock.txt" in readme, "the tests install from the lock file"


def test_the_readme_links_reach_pages_of_the_site() -> None:
    pages = _pages()
    links = _LINK.findall(README.read_text(encoding="utf-8"))
    docs_links = [link for link in links if link.startswith("docs/")]
    assert len(docs_links) >= 10, f"the README points into docs/: {links}"
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        assert (ROOT / path).is_file(), f"README.md links to {link}: no such file"
        if path.startswith("docs/"):
            page = path.removeprefix("docs/")
            assert page in pages, f"README.md links to {link}, which is not a page"
            if anchor:
                anchors = {_anchor(h) for h in _headings((DOCS / page).read_text("utf-8"))}
                assert anchor in anchors, f"README.md links to {link}: no such heading"


def test_the_sections_moved_from_the_readme_are_in_docs() -> None:
    missing = [
        f"{heading!r} in docs/{page}"
        for heading, page in MOVED_SECTIONS.items()
        if heading not in _headings((DOCS / page).read_text(encoding="utf-8"))
    ]
    assert missing == []


def test_the_files_and_tests_the_pages_name_exist() -> None:
    problems = []
    for source in [README, *sorted(DOCS.rglob("*.md"))]:
        text = source.read_text(encoding="utf-8")
        name = source.relative_to(ROOT).as_posix()
        problems += [
            f"{name}: {path}"
            for path in _PATH.findall(text)
            if not any(c.isupper() for c in path) and not (ROOT / path).is_file()
        ]
        # "tests/x.py::test_a, ::test_b": a bare ::test_b is in the last file named.
        current = None
        for path, test in _TEST_REF.findall(text):
            current = path or current
            assert current, f"{name}: ::{test} names no file before it"
            file = ROOT / current
            if not file.is_file() or not re.search(
                rf"def {test}\b", file.read_text(encoding="utf-8")
            ):
                problems.append(f"{name}: {current}::{test}")
    assert problems == []


def _shown_commands(text: str) -> list[list[str]]:
    """The ``smtp-tracker ...`` commands in *text*'s fenced code blocks, as words:
    continuation lines joined, comments, redirections and ``[ ]`` around an
    optional part dropped, each command of a ``&&``/``|``/``;``/``&`` chain apart."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    commands = []
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # not shell (a Postfix table, a log line)
            continue
        command: list[str] = []
        skip = False
        for word in [*words, ";"]:
            if skip:
                skip = False
            elif word in ("<", ">", "2>"):
                skip = True
            elif word in ("&&", "||", "|", ";", "&"):
                if command[:1] == ["smtp-tracker"]:
                    commands.append(command)
                command = []
            else:
                command.append(word.removeprefix("[").removesuffix("]"))
    return commands


def test_the_commands_the_pages_show_are_ones_the_command_line_takes() -> None:
    shown = [
        (source.relative_to(ROOT).as_posix(), command)
        for source in [README, *sorted(DOCS.rglob("*.md"))]
        for command in _shown_commands(source.read_text(encoding="utf-8"))
    ]
    assert len(shown) >= 20
    refused = []
    for where, command in shown:
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                _parser().parse_args(command[1:])
        except SystemExit:
            refused.append(f"{where}: {shlex.join(command)}: {stderr.getvalue().strip()}")
    assert refused == []


def test_the_docs_build_strictly_with_every_config_key(tmp_path: Path) -> None:
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert build.returncode == 0, build.stderr
    configuration = (site / "configuration" / "index.html").read_text(encoding="utf-8")
    assert "config-reference" not in configuration
    # The upstream password is a field but never a key: it comes from the environment.
    keys = [f.name for f in dataclasses.fields(Config) if f.name != "upstream_password"]
    assert len(keys) > 50
    assert [key for key in keys if f"<code>{key}</code>" not in configuration] == []
    assert "SMTP_TRACKER_UPSTREAM_PASSWORD" in configuration


def _hook() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("config_reference_hook", HOOK)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _page(src_uri: str) -> Any:
    return types.SimpleNamespace(file=types.SimpleNamespace(src_uri=src_uri))


def test_the_hook_fails_the_build_clearly_without_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hook = _hook()
    page = _page("configuration.md")
    monkeypatch.setitem(sys.modules, "smtp_tracker.cli.flags", types.ModuleType("flags"))
    with pytest.raises(PluginError, match=r"cannot import smtp_tracker\.cli\.flags\.reference"):
        hook.on_page_markdown(f"# C\n{hook.MARKER}\n", page=page, config={}, files=None)


def test_the_hook_needs_its_marker_once_and_touches_no_other_page() -> None:
    hook = _hook()
    with pytest.raises(PluginError, match="exactly once"):
        hook.on_page_markdown("# C\n", page=_page("configuration.md"), config={}, files=None)
    other = f"# Other\n{hook.MARKER}\n"
    assert hook.on_page_markdown(other, page=_page("index.md"), config={}, files=None) == other
    made = hook.on_page_markdown(
        f"# C\n## Reference\n{hook.MARKER}\n", page=_page("configuration.md"), config={}, files=None
    )
    assert hook.MARKER not in made
    assert "\n### " in made and "\n## Reference\n" in made  # its sections under Reference
