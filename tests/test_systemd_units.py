"""contrib/systemd's units as systemd itself reads them (``systemd-analyze verify``, each template with an
instance name): a setting systemd ignores or rejects (an unquoted Environment= value with a space, a misspelt
key) fails here instead of silently on an operator's host. The units' options are documented in
docs/operator.md."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "contrib" / "systemd"
ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(ANALYZE is None, reason="needs systemd-analyze (package systemd)")
@pytest.mark.parametrize("unit", sorted(p.name for p in UNITS.glob("*.service")) +
                         sorted(p.name for p in UNITS.glob("*.socket")))
def test_systemd_reads_the_unit_without_complaint(unit: str, tmp_path: Path) -> None:
    assert ANALYZE is not None
    name = unit.replace("@.", "@vm1.")  # a template is verified as one of its instances
    # The socket unit names its service: both go in, so the reference resolves.
    for other in UNITS.iterdir():
        (tmp_path / other.name.replace("@.", "@vm1.")).write_bytes(other.read_bytes())
    result = subprocess.run([ANALYZE, "verify", "--man=no", f"./{name}"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    # The install location (/opt/vmfront) does not exist on a test machine: that and only that may be said.
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if line.strip() and "/opt/vmfront" not in line and "not executable" not in line]
    assert not complaints, "\n".join(complaints)
