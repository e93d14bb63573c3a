"""What `pip install` puts into site-packages (issue 13, packaging): nothing
under a name another distribution owns (PyPI's `daemons`), every sub-package
of the daemons folder, the demo page, `py.typed` and the licence."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_installs_libipc_daemons_not_daemons(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("libipc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"ipc_core", "libipc_daemons", next(t for t in tops if t.endswith(".dist-info"))}
    packages = sorted(
        str(init.parent.relative_to(ROOT)).replace("daemons", "libipc_daemons", 1)
        for init in (ROOT / "daemons").rglob("__init__.py")
    ) + sorted(
        str(init.parent.relative_to(ROOT)) for init in (ROOT / "ipc_core").rglob("__init__.py")
    )
    for package in packages:
        assert f"{package}/__init__.py" in names, f"{package} missing: list it in pyproject.toml"
    assert "libipc_daemons/static/index.html" in names
    assert "ipc_core/py.typed" in names
    assert any(name.endswith("/licenses/LICENSE") for name in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "ipc-tcpd = libipc_daemons.tcpd:main" in text and "= daemons." not in text
