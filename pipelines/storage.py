"""Storage: the one place that turns a URI (local path or s3://...) into a filesystem.

Everything else calls `Storage.for_uri` and works on paths; local disk, S3 and a test S3 server are one code
path. Credentials and endpoint come from the standard AWS environment unless the config's `storage` section
sets them.
"""

from __future__ import annotations

import io
import json
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.config import StorageConfig
from pipelines.errors import InputError, OutputError, RerankError

log = logging.getLogger(__name__)

_GLOB_CHARS = set("*?[")


def _is_hidden(path: str, root: str) -> bool:
    rel = path[len(root) :].lstrip("/") if path.startswith(root) else path
    return any(part.startswith(("_", ".")) for part in rel.split("/") if part)


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


@contextmanager
def _fails_as(error: type[RerankError], what: str, keep: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Storage errors (after the S3 client's retries) -> one line naming the URI; RerankErrors and `keep` pass."""
    try:
        yield
    except (RerankError, *keep):
        raise
    except Exception as err:  # noqa: BLE001 - botocore, aiohttp, OSError and pyarrow errors alike
        raise error(f"{what}: {_short(err)}") from None


@dataclass
class Storage:
    """An fsspec filesystem (listing, small files) and its pyarrow twin (Ray Data reads and writes)."""

    protocol: str
    fs: fsspec.AbstractFileSystem
    arrow_fs: pafs.FileSystem

    @classmethod
    def for_uri(cls, uri: str, config: StorageConfig | None = None) -> Storage:
        config = config or StorageConfig()
        protocol = uri.split("://", 1)[0] if "://" in uri else "file"
        if protocol in ("s3", "s3a"):
            fs = fsspec.filesystem("s3", **s3_options(config))
            return cls("s3", fs, pafs.PyFileSystem(pafs.FSSpecHandler(fs)))
        if protocol == "file":
            return cls("file", fsspec.filesystem("file"), pafs.LocalFileSystem())
        try:
            fs = fsspec.filesystem(protocol)
        except (ImportError, ValueError) as err:
            raise InputError(f"unsupported storage scheme {protocol!r} in {uri!r}: {_short(err)}") from None
        return cls(protocol, fs, pafs.PyFileSystem(pafs.FSSpecHandler(fs)))

    def path(self, uri: str) -> str:
        """The filesystem path of a URI: bucket/key for S3, an absolute path on local disk."""
        if self.protocol == "file":
            return os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
        return uri.split("://", 1)[1].rstrip("/")

    def uri(self, path: str) -> str:
        return path if self.protocol == "file" else f"{self.protocol}://{path}"

    # ------------------------------------------------------------------ reading

    def list_parquet(self, uris: str | list[str]) -> list[tuple[str, int]]:
        """Resolve a folder, a glob or a list of files into (path, size) pairs, sorted; hidden names skipped."""
        found: dict[str, int] = {}
        for uri in [uris] if isinstance(uris, str) else uris:
            path = self.path(uri)
            try:
                if _GLOB_CHARS & set(path):
                    matches = self.fs.glob(path, detail=True)
                    infos = {p: i for p, i in matches.items() if i.get("type") == "file"}
                elif self.fs.isdir(path):
                    infos = {
                        p: i
                        for p, i in self.fs.find(path, detail=True).items()
                        if p.endswith(".parquet") and not _is_hidden(p, path)
                    }
                elif self.fs.exists(path):
                    infos = {path: self.fs.info(path)}
                else:
                    raise InputError(f"input not found: {uri}")
            except InputError:
                raise
            except Exception as err:  # noqa: BLE001 - botocore raises its own hierarchy (NoCredentialsError ...)
                raise InputError(f"cannot list {uri}: {_short(err)}") from None
            if not infos:
                raise InputError(f"no Parquet files found at {uri}")
            others = sorted(p for p in infos if not p.endswith(".parquet"))
            if others:
                raise InputError(
                    f"{self.uri(others[0])} does not end in .parquet: Ray Data reads only *.parquet files; "
                    "rename the files or narrow input.uri"
                )
            for p, info in infos.items():
                found[p.rstrip("/")] = int(info.get("size") or 0)
        return sorted(found.items())

    def read_schema(self, path: str) -> pa.Schema:
        try:
            with self.fs.open(path, "rb") as f:
                return pq.read_schema(f)
        except Exception as err:  # noqa: BLE001 - storage errors and ArrowInvalid alike mean "unusable file"
            raise InputError(f"cannot read Parquet schema of {self.uri(path)}: {_short(err)}") from None

    # ------------------------------------------------------------------ writing

    def check_output(self, uri: str, mode: str, protect: list[str]) -> str:
        """Check that the output folder may be written as asked (nothing is deleted yet); returns its path."""
        path = self.path(uri)
        for other in protect:
            o = other.rstrip("/")
            if o == path or o.startswith(path + "/") or path.startswith(o + "/"):
                raise OutputError(f"output.uri {uri} overlaps the input {self.uri(o)}; choose a separate folder")
        try:
            exists = self.fs.exists(path) and (not self.fs.isdir(path) or bool(self.fs.ls(path)))
        except Exception as err:  # noqa: BLE001 - botocore's hierarchy, as for listing
            raise OutputError(f"cannot access output {uri}: {_short(err)}") from None
        if exists and mode != "overwrite":
            raise OutputError(
                f"output {uri} already holds files; set output.mode=overwrite to replace them or pick a new output.uri"
            )
        return path

    def clear_output(self, path: str) -> None:
        """Delete what an earlier run left (output.mode=overwrite was checked by check_output)."""
        if self.fs.exists(path):
            log.info("output.mode=overwrite: deleting %s", self.uri(path))
            self.fs.rm(path, recursive=True)
        if self.protocol == "file":
            os.makedirs(path, exist_ok=True)

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file atomically: no reader ever sees it half-written. On local disk the bytes go to a
        hidden temporary name in the same folder, then one rename; an S3 object appears only once its upload
        has completed. Rewriting the same path (a retried task) replaces the file."""
        try:
            if self.protocol == "file":
                folder, name = os.path.split(path)
                os.makedirs(folder, exist_ok=True)
                tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
                try:
                    with open(tmp, "wb") as f:
                        f.write(data)
                    os.replace(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            else:
                self.fs.pipe_file(path, data)
        except Exception as err:  # noqa: BLE001 - permission, disk full, storage errors: all name the file
            raise OutputError(f"cannot write {self.uri(path)}: {_short(err)}") from None

    def write_json(self, path: str, data: Any) -> None:
        self.write_bytes(path, json.dumps(data, indent=2, default=str).encode())

    def write_text(self, path: str, text: str) -> None:
        self.write_bytes(path, text.encode())

    def write_parquet(self, path: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write_bytes(path, buf.getvalue())

    def read_json(self, path: str) -> Any:
        try:
            with _fails_as(OutputError, f"cannot read {self.uri(path)}", keep=(FileNotFoundError,)):
                return json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def remove(self, path: str) -> None:
        """Delete a file or a folder tree; missing is fine."""
        try:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        except Exception as err:  # noqa: BLE001
            raise OutputError(f"cannot delete {self.uri(path)}: {_short(err)}") from None

    def check_writable(self, folder: str) -> None:
        """Write and delete a probe file, so an unwritable output is found before any scoring."""
        probe = f"{folder}/_write_probe.{uuid.uuid4().hex[:8]}"
        self.write_bytes(probe, b"")
        self.remove(probe)

    def list_names(self, folder: str, suffix: str) -> list[str]:
        """Names (not paths) of the files directly in a folder that end in suffix; a missing folder is empty."""
        try:
            with _fails_as(OutputError, f"cannot list {self.uri(folder)}", keep=(FileNotFoundError,)):
                return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False) if p.endswith(suffix))
        except FileNotFoundError:
            return []

    def parquet_files(self, folder: str) -> list[str]:
        with _fails_as(OutputError, f"cannot list {self.uri(folder)}"):
            if not self.fs.exists(folder):
                return []
            return sorted(p for p in self.fs.find(folder) if p.endswith(".parquet") and not _is_hidden(p, folder))

    def read_column(self, path: str, column: str) -> pa.ChunkedArray:
        with _fails_as(InputError, f"cannot read column {column!r} of {self.uri(path)}"), self.fs.open(path, "rb") as f:
            return pq.read_table(f, columns=[column]).column(column)


def s3_options(config: StorageConfig) -> dict[str, Any]:
    """s3fs options from the config; anything unset falls back to the AWS environment (AWS_ENDPOINT_URL ...)."""
    opts: dict[str, Any] = {}
    client: dict[str, Any] = {}
    endpoint = config.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    if config.region:
        client["region_name"] = config.region
    if config.profile:
        opts["profile"] = config.profile
    if config.access_key_id:
        opts["key"] = config.access_key_id
    if config.secret_access_key:
        opts["secret"] = config.secret_access_key
    if config.session_token:
        opts["token"] = config.session_token
    if config.anon:
        opts["anon"] = True
    if client:
        opts["client_kwargs"] = client
    # Listing right after a write must see the new objects; also avoids stale results between job stages.
    opts["use_listings_cache"] = False
    # Transient errors are retried by botocore ("standard" mode: 500/502/503/504, throttling such as 503 SlowDown,
    # connection resets and timeouts; random exponential backoff up to 20 s). s3fs retries on top of that, 5 times
    # (not configurable per instance): SlowDown, resets and timeouts again, and errors while reading a body.
    opts["config_kwargs"] = {
        "retries": {"max_attempts": config.retries, "mode": "standard"},
        "connect_timeout": config.connect_timeout_s,
        "read_timeout": config.read_timeout_s,
    }
    return opts
