"""The engine and image scripts wait for another apt instead of failing at once (issue 8 item 11).

A loaded CI machine often has another apt running (unattended-upgrades, a second job). Every script
installs through the one ``apt_get`` of ``.ci/apt.sh``, which is run here with a stand-in ``apt-get`` on PATH that answers the way apt 2.6 does while another
process holds the lists lock: ``E: Could not get lock /var/lib/apt/lists/lock. It is held by process N
(apt-get)`` and exit 100 (``apt-get update`` does not wait for that lock even with DPkg::Lock::Timeout).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = [REPO / ".ci" / "docker-engine.sh", REPO / "backends" / "docker" / "build-images.sh",
           REPO / ".ci" / "postgres.sh"]
APT_LIB = REPO / ".ci" / "apt.sh"

FAKE_APT = """#!/bin/sh
echo "$*" >> "{log}"
calls=$(wc -l < "{log}")
if [ "$calls" -le {busy} ]; then
    echo "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 4242 (apt-get)" >&2
    echo "E: Unable to lock directory /var/lib/apt/lists/" >&2
    exit 100
fi
if [ -n "{fail}" ]; then echo "E: Unable to locate package nosuch" >&2; exit 100; fi
exit 0
"""


def run_apt_get(tmp_path: Path, *args: str, busy: int = 0, fail: bool = False):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    log.write_text("")
    fake = bin_dir / "apt-get"
    fake.write_text(FAKE_APT.format(log=log, busy=busy, fail="yes" if fail else ""))
    fake.chmod(0o755)
    script = f"set -euo pipefail\nsay() {{ printf '%s\\n' \"$*\" >&2; }}\nsource {APT_LIB}\napt_get \"$@\""
    proc = subprocess.run(["bash", "-c", script, "apt", *args],
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin", "APT_LOCK_WAIT": "60",
                               "APT_LOCK_RETRY_SECONDS": "0.05"})
    return proc, log.read_text().splitlines()


def test_apt_get_waits_while_another_apt_holds_the_lock(tmp_path):
    proc, calls = run_apt_get(tmp_path, "update", "-qq", busy=3)
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 4  # three refusals while the lock was held, then the run that got it
    assert all(call.startswith("-o DPkg::Lock::Timeout=60 update") for call in calls)
    assert "another apt holds its lock (held by process 4242 (apt-get))" in proc.stderr


def test_apt_get_fails_at_once_on_any_other_error(tmp_path):
    proc, calls = run_apt_get(tmp_path, "install", "-y", "nosuch", fail=True)
    assert proc.returncode == 100
    assert len(calls) == 1
    assert "Unable to locate package nosuch" in proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_apt_call_on_the_host_goes_through_apt_get(script):
    text = script.read_text()
    assert re.search(r"^\s*source .*/apt\.sh\"$", text, re.M), f"{script.name} does not source .ci/apt.sh"
    direct = [line.strip() for line in text.splitlines()
              if re.search(r"(^|[\s;&|(])apt-get\s", line) and not line.strip().startswith("#")
              and "say " not in line and "die " not in line and not line.strip().startswith("echo ")]
    # The one exception: apt inside the freshly debootstrapped root, whose locks nobody else can hold.
    direct = [line for line in direct if not line.startswith('sh -c "apt-get update -qq && apt-get install')]
    assert direct == [], f"apt-get called without the lock wait in {script.name}: {direct}"
