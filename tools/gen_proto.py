"""Regenerate the checked-in protobuf/gRPC Python code, with mypy-protobuf's typed .pyi stubs, from proto/ (`make proto`)."""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "fedcore" / "wire" / "proto"
PROTOS = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))


def _plugin(name: str) -> Path:
    """A protoc plugin of mypy-protobuf (the typed .pyi stubs): beside this interpreter (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = beside if beside.is_file() else shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found beside {sys.executable} nor on PATH: install mypy-protobuf (`make install`)")
    return Path(found)


def generate(out_dir: Path) -> None:
    """Run grpc_tools.protoc into out_dir, then make the generated imports package-relative."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *PROTOS,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for py in [*out_dir.rglob("*_grpc.py"), *out_dir.rglob("*_grpc.pyi")]:
        # `from feddiff.v1 import feddiff_pb2` -> `from fedcore.wire.proto.feddiff.v1 import feddiff_pb2`
        text = re.sub(r"^from feddiff\.v1 import", "from fedcore.wire.proto.feddiff.v1 import", py.read_text(), flags=re.M)
        py.write_text(text)
    for d in [out_dir, *[p for p in out_dir.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    (out_dir / "__init__.py").write_text('"""Generated from proto/ by `make proto`; never edited by hand."""\n')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        if args.out.exists():
            shutil.rmtree(args.out)
        shutil.copytree(tmp, args.out)
    print(f"generated {', '.join(PROTOS)} into {args.out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
