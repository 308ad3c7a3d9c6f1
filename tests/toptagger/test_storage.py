"""Storage against a real S3-compatible server on loopback (moto's standalone server)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from serving.process import free_port
from tests.conftest import wait_for_port
from toptagger import storage
from toptagger.errors import StorageError


def test_folder_round_trip(s3_env: str, tmp_path: Path) -> None:
    model = tmp_path / "model"
    (model / "fpga").mkdir(parents=True)
    (model / "weights.safetensors").write_bytes(os.urandom(10_000))
    (model / "config.json").write_text('{"image_size": 64}')
    (model / "fpga" / "plan.json").write_text("{}")
    storage.upload_dir(model, f"{s3_env}/models/top-tagger/1")
    back = storage.download_dir(f"{s3_env}/models/top-tagger/1", tmp_path / "back")
    for path in model.rglob("*"):
        if path.is_file():
            assert (back / path.relative_to(model)).read_bytes() == path.read_bytes()


def test_large_file_goes_multipart(s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # S3's smallest part is 5 MiB; lower the threshold so that 12 MiB moves in three parts.
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(storage, "MULTIPART_CHUNK", 5 * 1024 * 1024)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 * 1024 * 1024))
    uri = f"{s3_env}/big/big.bin"
    storage.upload(big, uri)
    loc = storage.S3Location.parse(uri)
    head = storage.s3_client().head_object(Bucket=loc.bucket, Key=loc.key)
    assert head["ETag"].strip('"').endswith("-3"), "a multipart upload's ETag ends in -<parts>"
    out = storage.download(uri, tmp_path / "copy.bin")
    assert out.read_bytes() == big.read_bytes()


def test_missing_key_and_bucket(s3_env: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"s3://.*/nope\.h5: no such object"):
        storage.download(f"{s3_env}/nope.h5", tmp_path / "x")
    with pytest.raises(StorageError, match="no such bucket"):
        storage.check_writable("s3://bucket-that-does-not-exist/x.h5")
    assert not storage.exists(f"{s3_env}/nope.h5")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_download_leaves_nothing(s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection drops half-way through every attempt: no file, no partial file."""
    from botocore.exceptions import ResponseStreamingError

    uri = f"{s3_env}/data/blob.bin"
    source = tmp_path / "blob.bin"
    source.write_bytes(os.urandom(2 * 1024 * 1024))
    storage.upload(source, uri)

    class DroppingStream:
        def __init__(self, body: Any) -> None:
            self.body, self.sent = body, 0

        def read(self, size: int | None = None) -> bytes:
            if self.sent > 256 * 1024:
                raise ResponseStreamingError(error="connection reset by peer")
            chunk = self.body.read(size)
            self.sent += len(chunk)
            return chunk

        def __getattr__(self, name: str) -> Any:
            return getattr(self.body, name)

    def drop(parsed: dict, **_: Any) -> None:
        parsed["Body"] = DroppingStream(parsed["Body"])

    real_client = storage.s3_client

    def faulty_client() -> Any:
        client = real_client()
        client.meta.events.register("after-call.s3.GetObject", drop)
        return client

    monkeypatch.setattr(storage, "s3_client", faulty_client)
    dest = tmp_path / "out" / "blob.bin"
    with pytest.raises(StorageError, match=r"blob\.bin"):
        storage.download(uri, dest)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == [], "no .part file left behind"


def test_bad_credentials_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that checks credentials (moto with auth on) rejects unknown keys with a clear error."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, server)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        with pytest.raises(StorageError, match=r"access denied .*check the S3 credentials"):
            storage.download("s3://bucket/key.h5", tmp_path / "x")
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_unreachable_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setattr(storage, "s3_client", _no_retry_client(storage.s3_client))
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint"):
        storage.download("s3://bucket/key.h5", tmp_path / "x")


def _no_retry_client(factory: Any) -> Any:
    def build() -> Any:
        client = factory()
        client.meta.config.retries = {"max_attempts": 1, "mode": "standard"}
        return client

    return build


def test_local_paths_pass_through(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("x")
    with storage.local_copy(path) as local:
        assert local == path
    storage.copy_local(path, tmp_path / "b.txt")
    assert (tmp_path / "b.txt").read_text() == "x"


def test_s3_uri_needs_a_bucket() -> None:
    with pytest.raises(StorageError, match="needs a bucket"):
        storage.S3Location.parse("s3:///key")
