"""The ``trio-gpu-plugin`` command line: a thin layer over the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-gpu-plugin",
        description=(
            "A Kubernetes device plugin for NVIDIA GPUs, on trio. This release ships the "
            "library's foundation: the kubelet device-plugin API v1beta1 (a pure-Python "
            "protobuf codec) and gRPC over Unix sockets; see README.md."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m trio_gpu_plugin``."""
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
