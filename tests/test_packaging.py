"""A plain (not editable) install must carry the page: the wheel built from the tree holds stream/web/."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE_FILES = sorted(p.name for p in (ROOT / "stream" / "web").iterdir() if p.is_file())


def test_wheel_contains_the_page(tmp_path: Path) -> None:
    assert {"index.html", "app.js", "view.html", "style.css"} <= set(PAGE_FILES)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("stream-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in PAGE_FILES if f"stream/web/{name}" not in names]
    assert not missing, f"the wheel lacks the page files {missing}"
    assert "stream/server/app.py" in names and "stream/models/builtin.py" in names


def test_server_finds_the_page_through_the_package() -> None:
    from stream.server import app

    assert (app.WEB_DIR / "index.html").is_file()
    assert app.WEB_DIR.resolve() == (ROOT / "stream" / "web").resolve()
