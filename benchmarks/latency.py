"""The pipeline's latency per stage with no network: `stream bench`, always with its JSON last line.

    python -m benchmarks.latency --model tiny --width 256 --height 256 --steps 4 --guidance 2 --frames 100
    python -m benchmarks.latency --model random:sd-turbo --device cuda --steps 1 --plot latency.png

Every flag of `stream bench` works here (`python -m benchmarks.latency --help`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from stream.cli import main as stream_main


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        return stream_main(["bench", "--help"])
    return stream_main(["bench", *args, *([] if "--json" in args else ["--json"])])


if __name__ == "__main__":
    sys.exit(main())
