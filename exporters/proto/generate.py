"""Regenerate profile_pb2.py from profile.proto with grpcio-tools' protoc.

    python -m exporters.proto.generate          # rewrite profile_pb2.py
    python -m exporters.proto.generate --check  # exit 1 if it is stale

The generated file is committed so the agent needs only the protobuf runtime,
not protoc. protoc stamps its own version into the file and the runtime
refuses gencode newer than itself, so pyproject's protobuf lower bound must be
at least that stamp (see PROTOBUF_GENCODE_VERSION in profile_pb2.py).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent.parent
# Registered in the descriptor pool under this repo-relative name, so it cannot
# clash with another library's bare "profile.proto".
PROTO_NAME = "exporters/proto/profile.proto"
GENERATED = PROTO_DIR / "profile_pb2.py"


def generate(out_dir: Path) -> Path:
    """Run protoc into `out_dir` and return the path of the new profile_pb2.py.

    Raises RuntimeError if grpc_tools is missing or protoc fails.
    """
    try:
        import grpc_tools  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("grpc_tools not installed: pip install -e '.[test]'") from exc
    proc = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO_ROOT}", f"--python_out={out_dir}", PROTO_NAME],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"protoc failed: {proc.stderr.strip()}")
    return Path(out_dir) / "exporters" / "proto" / "profile_pb2.py"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp)).read_bytes()
    if "--check" in args:
        if not GENERATED.exists() or GENERATED.read_bytes() != fresh:
            print(f"{GENERATED} is stale: run python -m exporters.proto.generate", file=sys.stderr)
            return 1
        return 0
    GENERATED.write_bytes(fresh)
    print(f"wrote {GENERATED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
