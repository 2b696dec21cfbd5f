"""Regenerate the committed protobuf/gRPC code, or check that it is current.

Generated code is committed so that the SDK installs without grpcio-tools on a device, which
means it can silently go stale: `--check` regenerates into a scratch folder and fails on any
difference, and CI runs it.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
WIRE_PACKAGE = Path("zkunlearn") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _protos(proto_root: Path) -> list[Path]:
    return sorted((proto_root / WIRE_PACKAGE).glob("*.proto"))


def generate(out_root: Path, proto_root: Path = PROTO_ROOT) -> None:
    from grpc_tools import protoc  # dev dependency; imported late so --help works without it

    protos = [str(p.relative_to(proto_root)) for p in _protos(proto_root)]
    if not protos:
        raise SystemExit(f"no .proto files under {proto_root / WIRE_PACKAGE}")
    # The mypy-protobuf plugins live beside this interpreter, which need not be on PATH (make, CI).
    plugin_dir = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={plugin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={plugin_dir / 'protoc-gen-mypy_grpc'}",
        f"-I{proto_root}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed: " + " ".join(args))


def _generated_files(root: Path) -> dict[str, Path]:
    folder = root / WIRE_PACKAGE
    return (
        {p.name: p for p in folder.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}
        if folder.exists()
        else {}
    )


def check(proto_root: Path = PROTO_ROOT) -> list[str]:
    """Return the names of generated files that differ from a fresh generation (empty when current)."""
    with tempfile.TemporaryDirectory() as scratch:
        scratch_root = Path(scratch)
        generate(scratch_root, proto_root)
        fresh = _generated_files(scratch_root)
        committed = _generated_files(proto_root)
        stale = sorted(set(fresh) ^ set(committed))
        stale += sorted(
            n for n in set(fresh) & set(committed) if not filecmp.cmp(fresh[n], committed[n], False)
        )
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    options = parser.parse_args(argv)
    if options.check:
        stale = check()
        if stale:
            print("stale generated protobuf code: " + ", ".join(stale), file=sys.stderr)
            print("run: python tools/protogen.py", file=sys.stderr)
            return 1
        print("generated protobuf code is current")
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        generate(Path(scratch))
        for name, path in _generated_files(Path(scratch)).items():
            shutil.copyfile(path, PROTO_ROOT / WIRE_PACKAGE / name)
    print(f"regenerated {PROTO_ROOT / WIRE_PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
