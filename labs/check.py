"""Check a lab answer: ``python -m labs.check LAB ANSWER``.

    python -m labs.check --list                        # the labs
    python -m labs.check provenance --template > labs/answers/provenance.txt
    python -m labs.check provenance labs/answers/provenance.txt

Exit codes: 0 right; 1 not right yet (each line says what); 2 the answer file (or a run
folder it names) cannot be read, or a usage error. Run folders in an answer file are
relative to the current directory (the repository root in labs/README.md).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .common import AnswerError

# name -> module, in the order of labs/README.md
LABS = {
    "provenance": "labs.provenance",
    "grid": "labs.grid",
    "placement": "labs.placement",
    "waiting": "labs.waiting",
    "buffers": "labs.buffers",
    "memory": "labs.memory_lab",
    "motion": "labs.motion",
    "replicas": "labs.replicas",
}


def lab(name: str):
    return importlib.import_module(LABS[name])


def answer_name(name: str) -> str:
    """The suggested answer file of a lab (labs/README.md)."""
    return f"labs/answers/{name}.{'txt' if name == 'provenance' else 'toml'}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labs.check", description=__doc__.split(
        "\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("lab", nargs="?", choices=list(LABS), metavar="LAB",
                    help="one of: " + ", ".join(LABS))
    ap.add_argument("answer", nargs="?", help="your answer file")
    ap.add_argument("--template", action="store_true", help="print a blank answer file")
    ap.add_argument("--list", action="store_true", help="list the labs")
    a = ap.parse_args(argv)
    if a.list:
        for i, name in enumerate(LABS, 1):
            print(f"{i}. {name:<11} {lab(name).TITLE}  (answer: {answer_name(name)})")
        return 0
    if a.lab is None:
        ap.error("name a lab (--list shows them)")
    mod = lab(a.lab)
    if a.template:
        sys.stdout.write(mod.TEMPLATE)
        return 0
    if a.answer is None:
        ap.error(f"give your answer file, e.g. {answer_name(a.lab)} (make one with "
                 f"python -m labs.check {a.lab} --template > {answer_name(a.lab)})")
    try:
        v = mod.check(Path(a.answer), Path.cwd())
    except AnswerError as e:
        sys.stderr.write(f"labs.check: error: {e}\n")
        return 2
    print(f"lab {list(LABS).index(a.lab) + 1} ({a.lab}): {mod.TITLE}")
    for n in v.notes:
        print(f"  . {n}")
    for w in v.wrong:
        print(f"  x {w}")
    if v.right:
        print("RIGHT: well done")
        return 0
    print(f"NOT YET: {len(v.wrong)} thing(s) to fix")
    return 1


if __name__ == "__main__":
    sys.exit(main())
