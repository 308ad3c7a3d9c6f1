"""Regenerate ``triton_extensions_pb2.py`` from ``triton_extensions.proto``.

protoc needs ``model_config.proto`` for the import, but tritonclient ships only its compiled
module. Its descriptor is exported as a FileDescriptorSet and handed to protoc with
``--descriptor_set_in``, so the import resolves to exactly the ModelConfig that clients use.

    python -m serving.triton.proto.build
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

from serving.triton.proto import load_model_config_pb2

HERE = Path(__file__).resolve().parent


def main() -> int:
    from grpc_tools import protoc

    model_config = load_model_config_pb2()
    files = descriptor_pb2.FileDescriptorSet()
    model_config.DESCRIPTOR.CopyToProto(files.file.add())
    with tempfile.TemporaryDirectory() as tmp:
        descriptor_set = Path(tmp) / "model_config.pb"
        descriptor_set.write_bytes(files.SerializeToString())
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"--proto_path={HERE}",
                f"--descriptor_set_in={descriptor_set}",
                f"--python_out={HERE}",
                str(HERE / "triton_extensions.proto"),
            ]
        )
    if status != 0:
        print("protoc failed", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
