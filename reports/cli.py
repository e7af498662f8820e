"""ov2 report: one self-contained HTML file from a run folder (what `ov2 run` ends with).

    ov2 report runs/default                          -> runs/default/report/index.html
    ov2 report runs/default --out /tmp/report.html
    ov2 report runs/a --compare runs/b               -> runs/a/report/compare_b.html (the two runs side by side)

Reads only files on disk (results.csv, stage status files, eval samples, metrics.jsonl, encoder_eval/result.json,
run.json, experiment.yaml, reports/reference/ and benchmarks/results/). The file needs no network: CSS inline,
plots as data URIs. A report written by ov2 is replaced; any other existing file only with --force.
"""

from __future__ import annotations

import argparse
import time

from ov2.cli import ArgumentParser, fail


def main(argv: list[str] | None = None) -> int:
    lines = __doc__.splitlines()
    parser = ArgumentParser(prog="ov2 report", description=lines[0], epilog="\n".join(lines[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", metavar="RUN_DIR", help="an `ov2 run` output folder")
    parser.add_argument("--out", metavar="FILE", default=None,
                        help="where to write the HTML (default RUN_DIR/report/index.html, or compare_<B>.html)")
    parser.add_argument("--compare", metavar="RUN_B", default=None,
                        help="a second run folder to set beside RUN_DIR (differences B - A with paired intervals)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file that ov2 did not write")
    args = parser.parse_args(argv)
    from reports.collect import BadRunFolder
    from reports.render import build_report

    start = time.perf_counter()
    try:
        out = build_report(args.run, out=args.out, compare=args.compare, force=args.force)
    except BadRunFolder as err:
        return fail("ov2 report", err)
    except OSError as err:  # e.g. --out in a folder we may not write
        return fail("ov2 report", f"{err.filename or ''}: {err.strerror or err}")
    size_kb = out.stat().st_size / 1024
    print(f"wrote {out} ({size_kb:,.0f} KB in {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
