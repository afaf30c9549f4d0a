"""The systemd units in ``conf/systemd/``: valid, hardened, and runnable under their rules.

* ``systemd-analyze verify`` passes on each unit, in a temporary root that
  holds the host's system units and stubs of ``/usr/local/bin/smtp-tracker``
  and ``kill`` (verify checks that ``ExecStart=`` and ``ExecReload=`` name
  executables in that root; the package is not installed at that path here).
* ``systemd-analyze security --offline=true`` rates each unit at most 2.5 (OK).
* Each ``ExecStart=`` command line is one our command line accepts.
* ``MemoryDenyWriteExecute=yes``: systemd enforces it with a seccomp filter
  (no mapping both writable and executable, no ``mprotect`` adding execute);
  the same filter, installed here through libseccomp, lets lxml rewrite a
  message, cryptography make and load a certificate, OpenSSL complete a TLS
  handshake and argon2 hash a password.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from smtp_tracker import cli

UNITS_DIR = Path(__file__).resolve().parents[2] / "conf" / "systemd"
UNITS = sorted(UNITS_DIR.glob("*.service"))
#: The rating ``systemd-analyze security`` must not exceed (its "OK" band).
MAX_EXPOSURE = 2.5
#: Where the host keeps its system units (Debian 12: /lib is /usr/lib).
HOST_UNITS = Path("/usr/lib/systemd/system")

analyze = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    analyze is None, reason="systemd-analyze is not installed (Debian package systemd)"
)


def unit_ids(units: list[Path]) -> list[str]:
    return [unit.name for unit in units]


def test_the_four_units_are_there() -> None:
    assert unit_ids(UNITS) == [
        "smtp-tracker-milter.service",
        "smtp-tracker-pixel.service",
        "smtp-tracker-reports.service",
        "smtp-tracker.service",
    ]


def exec_start(unit: Path) -> list[str]:
    (line,) = [line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
    return shlex.split(line.removeprefix("ExecStart="))


@pytest.mark.parametrize("unit", UNITS, ids=unit_ids(UNITS))
def test_exec_start_is_a_command_line_we_accept(unit: Path) -> None:
    binary, *arguments = exec_start(unit)
    assert binary == "/usr/local/bin/smtp-tracker"
    parsed = cli._parser().parse_args(arguments)  # exits (SystemExit) on an unknown flag
    assert parsed.command in {"serve", "pixel", "reports", "milter"}
    assert parsed.data_dir == "/var/lib/smtp-tracker"


@needs_analyze
@pytest.mark.parametrize("unit", UNITS, ids=unit_ids(UNITS))
def test_security_rates_the_unit_ok(unit: Path) -> None:
    assert analyze is not None
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found is not None, result.stdout + result.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, result.stdout


@pytest.fixture
def verify_root(tmp_path: Path) -> Path:
    """A root for ``systemd-analyze verify --root``: system units and a stub binary."""
    if not HOST_UNITS.is_dir():
        pytest.skip(f"{HOST_UNITS} is missing: no systemd units to verify against")
    root = tmp_path / "root"
    shutil.copytree(HOST_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    # ExecStart= and ExecReload= (kill, found in the root's /usr/bin) name these
    for stub in (root / "usr/local/bin/smtp-tracker", root / "usr/bin/kill"):
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    return root


@needs_analyze
@pytest.mark.parametrize("unit", UNITS, ids=unit_ids(UNITS))
def test_verify_passes(unit: Path, verify_root: Path) -> None:
    assert analyze is not None
    installed = verify_root / "etc/systemd/system" / unit.name
    shutil.copyfile(unit, installed)
    result = subprocess.run(
        [analyze, "verify", f"--root={verify_root}", f"/etc/systemd/system/{unit.name}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


#: Runs in a child: installs systemd's MemoryDenyWriteExecute= seccomp rules
#: (src/shared/seccomp-util.c, seccomp_memory_deny_write_execute), proves they
#: bite, then does what the service does with native code.
_UNDER_MDWE = r"""
import ctypes, ctypes.util, errno, mmap, ssl, sys, tempfile
from pathlib import Path

lib = ctypes.CDLL(ctypes.util.find_library("seccomp"), use_errno=True)

class Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

MASKED_EQ = 7
ALLOW = 0x7FFF0000
DENY = 0x00050000 | errno.EPERM
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_rule_add_array.argtypes = [
    ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(Cmp)]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
ctx = lib.seccomp_init(ALLOW)
rules = [
    ("mmap", PROT_WRITE | PROT_EXEC, PROT_WRITE | PROT_EXEC),
    ("mprotect", PROT_EXEC, PROT_EXEC),
    ("pkey_mprotect", PROT_EXEC, PROT_EXEC),
    ("shmat", SHM_EXEC, SHM_EXEC),
]
for name, mask, value in rules:
    number = lib.seccomp_syscall_resolve_name(name.encode())
    cmp = Cmp(2, MASKED_EQ, mask, value)
    assert lib.seccomp_rule_add_array(ctx, DENY, number, 1, ctypes.byref(cmp)) == 0, name
assert lib.seccomp_load(ctx) == 0

try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    pass
else:
    sys.exit("the filter is not in force")

from smtp_tracker.mime import RewritePolicy, rewrite
html = (b"From: a@example.org\r\nTo: b@example.net\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/html; charset=utf-8\r\n\r\n<html><body><p>hi</p></body></html>\r\n")
result = rewrite(html, "https://t.example/o/AAAAAAAAAAAAAAAAAAAAAAA.gif", RewritePolicy(),
                 reverse_path="a@example.org")
assert result.tracked, result.reason

from smtp_tracker.tls import load_server_context, write_self_signed
directory = Path(tempfile.mkdtemp())
write_self_signed(directory / "cert.pem", directory / "key.pem", hostnames=["localhost"])
server = load_server_context(directory / "cert.pem", directory / "key.pem")
client = ssl.create_default_context(cafile=str(directory / "cert.pem"))
c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
c = client.wrap_bio(c_in, c_out, server_hostname="localhost")
s = server.wrap_bio(s_in, s_out, server_side=True)
for _ in range(10):
    for side in (c, s):
        try:
            side.do_handshake()
        except ssl.SSLWantReadError:
            pass
    s_in.write(c_out.read())
    c_in.write(s_out.read())
c.do_handshake()
assert c.version() in ("TLSv1.2", "TLSv1.3"), c.version()

import argon2
hasher = argon2.PasswordHasher()
assert hasher.verify(hasher.hash("secret"), "secret")

import aiohttp, aiosmtpd.smtp, aiosmtplib, jinja2, sqlite3
sqlite3.connect(":memory:").execute("SELECT 1").fetchone()
print("ok")
"""


def test_lxml_cryptography_and_argon2_work_under_memory_deny_write_execute() -> None:
    import ctypes.util

    if ctypes.util.find_library("seccomp") is None:
        pytest.skip("libseccomp is not installed (Debian package libseccomp2)")
    result = subprocess.run(
        [sys.executable, "-c", _UNDER_MDWE],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr
