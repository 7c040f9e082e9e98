"""python -m raybench.analysis RUN_DIR [--out DIR]: the report of one run folder."""
from __future__ import annotations

import argparse
import sys

from raybench.analysis.report import analyse


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raybench.analysis", description=(
        "Tables (Markdown + Parquet), plots (PNG + SVG) and report.md from a run folder's epochs.parquet and "
        "trials.parquet."))
    p.add_argument("run_dir", help="run folder written by python -m raybench.grid (results/<run>)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/analysis)")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        report = analyse(args.run_dir, args.out)
    except (OSError, ValueError) as e:  # a bad folder (or --out) is the user's to fix: message, no traceback
        print(f"raybench.analysis: error: {e}", file=sys.stderr)
        return 1
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
