"""Local paths and ``s3://`` URIs behind one small API.

Datasets and model folders live on S3 in a cluster (MinIO in Kubeflow installs) and on local disk
on one machine. Every reader and writer in the project goes through these functions, so that each
of them accepts both kinds of location.

S3 settings come from the environment only, as boto3 and MinIO expect:

- endpoint: ``AWS_ENDPOINT_URL``, ``S3_ENDPOINT_URL`` or ``MLFLOW_S3_ENDPOINT_URL`` (MinIO);
- credentials: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (a Kubernetes Secret in a cluster);
- region: ``AWS_DEFAULT_REGION`` / ``AWS_REGION`` (default ``us-east-1``).

Downloads land under a temporary name and are renamed only after their size is verified, so an
interrupted transfer never leaves a partial file under the final name. Large files are moved in
multipart chunks; transient errors are retried by botocore's standard retry mode.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toptagger.constants import CACHE_ROOT
from toptagger.errors import StorageError

S3_SCHEME = "s3://"
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNK = 16 * 1024 * 1024
DEFAULT_CACHE = Path(os.environ.get("TOPTAGGER_CACHE", CACHE_ROOT / "s3"))


def is_s3(uri: str | os.PathLike[str]) -> bool:
    """True for ``s3://bucket/key`` URIs."""
    return str(uri).startswith(S3_SCHEME)


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        rest = uri[len(S3_SCHEME) :]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise StorageError(f"{uri}: an S3 URI needs a bucket, as in s3://bucket/path")
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.key}"


def endpoint_url() -> str | None:
    """The S3 endpoint from the environment; None means AWS itself."""
    for name in ("AWS_ENDPOINT_URL", "S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        if os.environ.get(name):
            return os.environ[name]
    return None


def s3_client() -> Any:
    """A boto3 S3 client configured from the environment (endpoint, region, retries)."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": 5, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        # MinIO and moto want path-style addressing; AWS accepts it too.
        s3={"addressing_style": "path"},
    )
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    return boto3.client("s3", endpoint_url=endpoint_url(), region_name=region, config=config)


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK)


def _explain(uri: str, exc: Exception, not_found: str = "no such object") -> StorageError:
    """Turn a botocore error into one message that names the URI and what the server said."""
    from boto3.exceptions import RetriesExceededError
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return StorageError(f"{uri}: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
    if isinstance(exc, EndpointConnectionError):
        return StorageError(f"{uri}: cannot reach the S3 endpoint {endpoint_url() or '(AWS default)'}")
    if isinstance(exc, RetriesExceededError):
        return StorageError(f"{uri}: transfer failed after retries ({exc.last_exception})")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            # HEAD answers carry no error body, so a bare 404 means whatever was asked about.
            return StorageError(f"{uri}: {not_found}")
        if code == "NoSuchBucket":
            return StorageError(f"{uri}: no such bucket")
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"{uri}: access denied ({code}); check the S3 credentials")
        return StorageError(f"{uri}: S3 error {code}: {exc}")
    return StorageError(f"{uri}: {exc}")


def _s3_errors() -> tuple[type[Exception], ...]:
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError, Boto3Error)


def exists(uri: str | os.PathLike[str]) -> bool:
    """Whether a file (or, for S3, an object) is at ``uri``."""
    uri = str(uri)
    if not is_s3(uri):
        return Path(uri).exists()
    loc = S3Location.parse(uri)
    try:
        s3_client().head_object(Bucket=loc.bucket, Key=loc.key)
        return True
    except _s3_errors() as exc:
        err = _explain(uri, exc)
        if "no such object" in str(err):
            return False
        raise err from None


def download(uri: str, dest: str | os.PathLike[str]) -> Path:
    """Copy the object at ``uri`` to ``dest``, atomically and size-verified."""
    loc = S3Location.parse(uri)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    client = s3_client()
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    try:
        try:
            size = client.head_object(Bucket=loc.bucket, Key=loc.key)["ContentLength"]
            client.download_file(loc.bucket, loc.key, tmp_name, Config=_transfer_config())
        except _s3_errors() as exc:
            raise _explain(uri, exc) from None
        got = os.path.getsize(tmp_name)
        if got != size:
            raise StorageError(f"{uri}: download incomplete ({got} of {size} bytes)")
        os.replace(tmp_name, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
    return dest


def upload(src: str | os.PathLike[str], uri: str) -> None:
    """Copy a local file to ``uri`` (multipart above 64 MiB) and verify the stored size."""
    src = Path(src)
    if not src.is_file():
        raise StorageError(f"{src}: no such file to upload")
    loc = S3Location.parse(uri)
    client = s3_client()
    try:
        client.upload_file(str(src), loc.bucket, loc.key, Config=_transfer_config())
        stored = client.head_object(Bucket=loc.bucket, Key=loc.key)["ContentLength"]
    except _s3_errors() as exc:
        raise _explain(uri, exc) from None
    if stored != src.stat().st_size:
        raise StorageError(f"{uri}: stored {stored} bytes, expected {src.stat().st_size}")


def download_dir(uri: str, dest: str | os.PathLike[str]) -> Path:
    """Copy every object under the prefix ``uri`` into the folder ``dest``."""
    loc = S3Location.parse(uri.rstrip("/") + "/")
    client = s3_client()
    dest = Path(dest)
    keys: list[str] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.key):
            keys += [obj["Key"] for obj in page.get("Contents", [])]
    except _s3_errors() as exc:
        raise _explain(uri, exc) from None
    if not keys:
        raise StorageError(f"{uri}: no such object, and no objects under this prefix")
    for key in keys:
        download(f"{S3_SCHEME}{loc.bucket}/{key}", dest / key[len(loc.key) :])
    return dest


def upload_dir(src: str | os.PathLike[str], uri: str) -> None:
    """Copy a local folder, recursively, under the prefix ``uri``."""
    src = Path(src)
    if not src.is_dir():
        raise StorageError(f"{src}: no such folder to upload")
    base = uri.rstrip("/")
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        upload(path, f"{base}/{path.relative_to(src).as_posix()}")


def cached_object(uri: str) -> Path | None:
    """A local copy of the S3 object at ``uri``, or None when no object has exactly that key.

    The cache is keyed by endpoint, URI and the object's ETag, so an object overwritten under the
    same key is downloaded again instead of being served stale.
    """
    loc = S3Location.parse(uri)
    try:
        etag = s3_client().head_object(Bucket=loc.bucket, Key=loc.key)["ETag"]
    except _s3_errors() as exc:
        err = _explain(uri, exc)
        if "no such object" in str(err):
            return None
        raise err from None
    digest = hashlib.sha256(f"{endpoint_url()}|{uri}|{etag}".encode()).hexdigest()[:16]
    cached = DEFAULT_CACHE / digest / (Path(loc.key).name or "object")
    if not cached.exists():
        download(uri, cached)
    return cached


@contextlib.contextmanager
def local_copy(uri: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a local path holding the file at ``uri``.

    Local paths are yielded as they are; S3 objects come from :func:`cached_object` (HDF5 needs
    random access, so streaming straight from S3 is not an option).
    """
    uri = str(uri)
    if not is_s3(uri):
        yield Path(uri)
        return
    cached = cached_object(uri)
    if cached is None:
        raise StorageError(f"{uri}: no such object")
    yield cached


@contextlib.contextmanager
def atomic_output(uri: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary local path; on success it becomes ``uri``, on error it disappears.

    For a local destination the file is renamed into place (atomic on one file system); for S3
    it is uploaded. A crash or Ctrl-C inside the block never leaves a truncated file behind.
    """
    uri = str(uri)
    if is_s3(uri):
        with tempfile.TemporaryDirectory(prefix="toptagger-upload-") as tmp:
            path = Path(tmp) / Path(S3Location.parse(uri).key).name
            yield path
            upload(path, uri)
        return
    final = Path(uri)
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".part")
    os.close(fd)
    os.unlink(tmp_name)  # writers (HDF5) want to create the file themselves
    try:
        yield Path(tmp_name)
        os.replace(tmp_name, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)


def replace_dir(staging: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """``staging`` (a folder beside ``final``) becomes ``final`` by renames only: a reader sees the
    old folder or the new one, never a half-written one."""
    staging, final = Path(staging), Path(final)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old)
    else:
        os.replace(staging, final)


def check_writable(uri: str | os.PathLike[str]) -> None:
    """Fail early, before any long work, when ``uri`` cannot be written."""
    uri = str(uri)
    if is_s3(uri):
        loc = S3Location.parse(uri)
        if not loc.key or loc.key.endswith("/"):
            raise StorageError(f"{uri}: an output URI must name an object, not a prefix")
        try:
            s3_client().head_bucket(Bucket=loc.bucket)
        except _s3_errors() as exc:
            raise _explain(uri, exc, not_found="no such bucket") from None
        return
    path = Path(uri)
    if path.is_dir():
        raise StorageError(f"{path}: is a directory; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise StorageError(f"{path}: the folder {parent} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise StorageError(f"{path}: cannot write in {parent} ({exc.strerror})") from None


def copy_local(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Copy a local file to any location (local or S3), atomically."""
    with atomic_output(dest) as tmp:
        shutil.copyfile(src, tmp)
