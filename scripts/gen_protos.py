"""Regenerates the Python code for protos/*.proto (the one documented command).

    python scripts/gen_protos.py            # writes protos/*_pb2*.py(i)
    python scripts/gen_protos.py --out DIR  # writes elsewhere (the staleness test)

The code is checked in so that installing tiergate needs no code generation;
tests/test_protos.py fails when it is stale.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = sorted((ROOT / "protos").glob("*.proto"))


def generate(out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # Proto paths are given relative to the root, so the generated modules
    # import each other as `protos.<name>_pb2`, which is the installed package.
    args = ["protoc", f"-I{ROOT}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
    args += [str(p.relative_to(ROOT)) for p in PROTOS]
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args.append(f"-I{include}")
    if protoc.main(args) != 0:
        sys.exit("protoc failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT, help="output root (default: the repository)")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
