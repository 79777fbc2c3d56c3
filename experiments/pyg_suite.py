"""PyG's own test suite with and without exactq's pytest plugin: pass/fail counts and every test that
passes without exactq and fails with it.

    python experiments/pyg_suite.py --pyg DIR [--paths test/nn test/utils test/explain] [--bits 8]

DIR is a checkout of PyG's repository (its ``test/`` folder; fetch it, never copy it into this project),
ideally at the installed version's tag. Each path runs twice in a subprocess, ``pytest -q PATH`` and
``pytest -q -p exactq.testing --exactq-bits BITS PATH``, with junit XML to compare test by test.
"""
from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from common import Timer, command_line, parser, write_results


def _outcomes(xml: Path) -> dict:
    out = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        tags = {child.tag for child in case}
        out[name] = ("failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed",
                     next((" ".join(c.get("message", "").split()).replace("|", "/")[:160]
                           for c in case if c.tag in ("failure", "error")), ""))
    return out


def _run(pyg: Path, path: str, extra: list, xml: Path) -> dict:
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *extra, path],
                   cwd=pyg, capture_output=True, text=True, timeout=1800)
    return _outcomes(xml)


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--pyg", required=True, help="a checkout of PyG's repository (with its test/ folder)")
    p.add_argument("--paths", nargs="+", default=["test/nn", "test/utils", "test/explain"])
    p.add_argument("--bits", type=int, default=8)
    args = p.parse_args(argv)
    pyg = Path(args.pyg).resolve()
    if not (pyg / "test").is_dir():
        raise SystemExit(f"--pyg must be a PyG checkout with a test/ folder, got {pyg}")
    rows, diffs = [], []
    with Timer() as timer:
        for path in args.paths:
            plain = _run(pyg, path, [], Path(args.out) / "_plain.xml")
            with_exactq = _run(pyg, path, ["-p", "exactq.testing", "--exactq-bits", str(args.bits)],
                               Path(args.out) / "_exactq.xml")
            count = lambda res, k: sum(1 for v in res.values() if v[0] == k)  # noqa: E731
            new = sorted(t for t, v in with_exactq.items() if v[0] == "failed" and plain.get(t, ("",))[0] == "passed")
            rows.append({"path": path, "tests": len(plain), "passed without": count(plain, "passed"),
                         "failed without": count(plain, "failed"), "passed with": count(with_exactq, "passed"),
                         "failed with": count(with_exactq, "failed"), "pass without, fail with": len(new)})
            diffs += [{"path": path, "test": t, "message": with_exactq[t][1]} for t in new]
            print(rows[-1])
    for tmp in ("_plain.xml", "_exactq.xml"):
        (Path(args.out) / tmp).unlink(missing_ok=True)
    note = f"pytest with and without `-p exactq.testing --exactq-bits {args.bits}` on PyG's tests in {pyg.name}."
    write_results(args.out, "pyg_suite", rows, note, command_line(), timer.seconds)
    if diffs:
        print(write_results(args.out, "pyg_suite_differences", diffs, "Tests that pass without exactq and fail with it.",
                            command_line(), timer.seconds))


if __name__ == "__main__":
    main()
