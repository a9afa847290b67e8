"""Storage: the one place that turns a URI (local path or s3://...) into a filesystem.

Everything else calls `Storage.for_uri` and works on paths; local disk, S3 and a test S3 server are one code
path. Credentials and endpoint come from the standard AWS environment unless the config's `storage` section
sets them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import shutil
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


def is_parquet_name(path: str) -> bool:
    return path.lower().endswith(".parquet")


@dataclass(frozen=True)
class FileInfo:
    """One listed file: its path, size and version (S3: ETag and version id; local: modification time)."""

    path: str
    size: int
    version: str = ""


def _version_of(info: dict[str, Any]) -> str:
    parts = []
    etag = info.get("ETag") or info.get("etag")
    if etag:
        parts.append(f"etag={str(etag).strip(chr(34))}")
    if info.get("VersionId"):
        parts.append(f"version_id={info['VersionId']}")
    mtime = info.get("mtime")
    if not parts and mtime is not None:
        parts.append(f"mtime={mtime!r}")
    return ";".join(parts)


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

    # ------------------------------------------------------------------ where a path really is

    def resolved(self, path: str) -> str:
        """The place a path names, for comparing places (inputs, outputs, what a deletion may touch). Local disk:
        the real path (symlinks followed, ``..``, repeated and trailing slashes gone; a part that does not exist
        yet is taken as spelled). S3: the prefix with repeated and trailing slashes gone (``s3://b/x``,
        ``s3://b/x/`` and ``s3://b//x`` are one prefix)."""
        if self.protocol == "file":
            return os.path.realpath(path)
        return _collapse(path)

    def location(self, path: str) -> str:
        """Where a file or folder itself lies (what deleting it removes): its parent resolved, its own name as it
        is (a symlink names the link, not its target). S3: as `resolved`."""
        if self.protocol != "file":
            return _collapse(path)
        path = os.path.abspath(path)
        parent, name = os.path.split(path)
        return os.path.join(os.path.realpath(parent), name) if name else path

    def _spellings(self, path: str, follow: bool = True) -> set[str]:
        """The places a path may name, for an overlap check that errs on the side of refusing: on S3 both the
        key as written (slashes collapsed) and with ``.`` and ``..`` parts applied (S3 keys take them literally,
        some tools do not)."""
        first = self.resolved(path) if follow else self.location(path)
        if self.protocol == "file":
            return {first}
        return {first, posixpath.normpath("/" + first).lstrip("/")}

    def overlaps(self, a: str, b: str) -> bool:
        """True when one path is the other or lies inside it, compared on resolved paths."""
        return any(_inside(x, y) or _inside(y, x) for x in self._spellings(a) for y in self._spellings(b))

    # ------------------------------------------------------------------ reading

    def list_parquet(self, uris: str | list[str]) -> list[FileInfo]:
        """Resolve a folder, a glob or a list of files into their Parquet files, sorted; hidden names skipped. In a
        folder, names ending in .parquet in any case count (Spark and others write .PARQUET); other files are
        listed in a warning, never silently dropped."""
        found: dict[str, FileInfo] = {}
        for uri in [uris] if isinstance(uris, str) else uris:
            path = self.path(uri)
            skipped: list[str] = []
            try:
                if _GLOB_CHARS & set(path):
                    matches = self.fs.glob(path, detail=True)
                    infos = {p: i for p, i in matches.items() if i.get("type") == "file"}
                    others = sorted(p for p in infos if not is_parquet_name(p))
                    if others:
                        raise InputError(
                            f"{self.uri(others[0])} does not end in .parquet (matched by {uri}): only Parquet files "
                            "are read; rename the files or narrow input.uri"
                        )
                elif self.fs.isdir(path):
                    infos = {}
                    for p, i in self.fs.find(path, detail=True).items():
                        if _is_hidden(p, path):
                            continue
                        if is_parquet_name(p):
                            infos[p] = i
                        else:
                            skipped.append(p)
                elif self.fs.exists(path):
                    infos = {path: self.fs.info(path)}
                else:
                    raise InputError(f"input not found: {uri}{self._missing_bucket_hint(path)}")
            except InputError:
                raise
            except Exception as err:  # noqa: BLE001 - botocore raises its own hierarchy (NoCredentialsError ...)
                raise InputError(f"cannot list {uri}: {_short(err)}{self._missing_bucket_hint(path)}") from None
            if not infos:
                what = (
                    f" (it holds {len(skipped)} other file(s), e.g. {', '.join(self.uri(p) for p in skipped[:3])}; "
                    "input files must end in .parquet)"
                    if skipped
                    else ""
                )
                raise InputError(f"no Parquet files found at {uri}{what}")
            if skipped:
                log.warning(
                    "input %s: skipped %d file(s) not ending in .parquet: %s%s",
                    uri,
                    len(skipped),
                    ", ".join(p.rsplit("/", 1)[-1] for p in skipped[:5]),
                    " ..." if len(skipped) > 5 else "",
                )
            for p, info in infos.items():
                p = p.rstrip("/")
                found[p] = FileInfo(p, int(info.get("size") or 0), _version_of(info))
        return [found[p] for p in sorted(found)]

    def _missing_bucket_hint(self, path: str) -> str:
        """'; bucket b does not exist' when that is why a listing found nothing (S3 only)."""
        if self.protocol != "s3":
            return ""
        bucket = path.split("/", 1)[0]
        try:
            if self.fs.exists(bucket):
                return ""
        except Exception:  # noqa: BLE001 - access denied to the bucket itself: say nothing more
            return ""
        return f" (bucket {bucket!r} does not exist or is not visible with these credentials)"

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
            if self.overlaps(path, other):
                raise OutputError(
                    f"output.uri {uri} overlaps the input {self.uri(other.rstrip('/'))} (compared where they really "
                    "are, symlinks followed); choose a separate folder"
                )
        try:
            exists = self.fs.exists(path) and (not self.fs.isdir(path) or bool(self.fs.ls(path)))
        except Exception as err:  # noqa: BLE001 - botocore's hierarchy, as for listing
            raise OutputError(f"cannot access output {uri}: {_short(err)}") from None
        if exists and mode != "overwrite":
            raise OutputError(
                f"output {uri} already holds files; set output.mode=overwrite to replace them or pick a new output.uri"
            )
        return path

    def clear_output(self, path: str, protect: tuple[str, ...] | list[str] = ()) -> None:
        """Delete what an earlier run left (output.mode=overwrite was checked by check_output): what the folder
        holds, never a place outside it or one that `protect` names (see `remove`)."""
        if self.fs.exists(path):
            log.info("output.mode=overwrite: deleting %s", self.uri(path))
            self.check_clearable(path, protect)
            for entry in self.fs.ls(path, detail=False):
                self.remove(entry, within=path, protect=protect)
        if self.protocol == "file":
            os.makedirs(path, exist_ok=True)

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file atomically: no reader ever sees it half-written. On local disk the bytes go to a
        hidden temporary name in the same folder, then one rename; an S3 object appears only once its upload
        has completed. Rewriting the same path (a retried task) replaces the file."""
        try:
            if self.protocol == "file":
                _local_write(path, data, exclusive=False)
            else:
                self.fs.pipe_file(path, data)
        except Exception as err:  # noqa: BLE001 - permission, disk full, storage errors: all name the file
            raise OutputError(f"cannot write {self.uri(path)}: {_short(err)}") from None

    # ------------------------------------------------------------------ conditional writes (the job's lease)

    def create_exclusive(self, path: str, data: bytes) -> str | None:
        """Create a file only if it does not exist, atomically; returns its tag (see `read_tagged`), or None when
        it exists. S3: a conditional PUT (``If-None-Match: *``, which S3 and MinIO honour); local disk: a hard
        link of a complete temporary file, which fails if the name exists."""
        try:
            if self.protocol == "file":
                _local_write(path, data, exclusive=True)
                return hashlib.sha1(data).hexdigest()
            return str((self.fs.pipe_file(path, data, mode="create") or {}).get("ETag", ""))
        except FileExistsError:
            return None
        except Exception as err:  # noqa: BLE001
            raise OutputError(f"cannot write {self.uri(path)}: {_short(err)}") from None

    def read_tagged(self, path: str) -> tuple[bytes, str] | None:
        """A file's bytes and a tag that changes whenever it is rewritten (S3: its ETag; local: a hash of its
        bytes), for `replace_if`; None when it does not exist."""
        try:
            with _fails_as(OutputError, f"cannot read {self.uri(path)}", keep=(FileNotFoundError,)):
                if self.protocol == "file":
                    with open(path, "rb") as f:
                        data = f.read()
                    return data, hashlib.sha1(data).hexdigest()
                # The tag first: if the object changes between the two requests, a replace_if with this tag fails.
                tag = str(self.fs.info(path).get("ETag", ""))
                return self.fs.cat_file(path), tag
        except FileNotFoundError:
            return None

    def replace_if(self, path: str, data: bytes, tag: str) -> str | None:
        """Rewrite a file only if it is still the version tagged `tag`; returns the new tag, or None if the file
        changed or is gone.
        S3: a conditional PUT (``If-Match``); local disk: compared and replaced under a file lock."""
        try:
            if self.protocol == "file":
                import filelock

                folder, name = os.path.split(path)
                with filelock.FileLock(os.path.join(folder, f".{name}.lock"), timeout=30):
                    current = self.read_tagged(path)
                    if current is None or current[1] != tag:
                        return None
                    self.write_bytes(path, data)
                    return hashlib.sha1(data).hexdigest()
            return str((self.fs.pipe_file(path, data, IfMatch=tag) or {}).get("ETag", ""))
        except FileNotFoundError:
            return None
        except OSError as err:
            if "pre-condition" in str(err).lower() or "precondition" in str(err).lower():
                return None
            raise OutputError(f"cannot write {self.uri(path)}: {_short(err)}") from None

    def write_json(self, path: str, data: Any, indent: int | None = 2) -> None:
        self.write_bytes(path, json.dumps(data, indent=indent, default=str).encode())

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

    def remove(self, path: str, within: str | None = None, protect: tuple[str, ...] | list[str] = ()) -> None:
        """Delete a file or a folder tree; missing is fine. On local disk a symlink is removed as a link (its
        target is never followed, nor are links inside a deleted tree).
        `within`: a second guard for deletions in an output folder: refused (OutputError, nothing deleted) unless
        the place `path` lies is inside the resolved `within`, and unless it neither holds nor lies in any of
        `protect` (the job's inputs): an output folder that is a symlink to, or another spelling of, the input
        never gets the input deleted, whatever checked it before."""
        if within is not None:
            self.check_removal(path, within, protect)
        try:
            if self.protocol == "file":
                if os.path.islink(path) or os.path.isfile(path):
                    os.unlink(path)
                elif os.path.isdir(path):
                    shutil.rmtree(path)
            elif self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        except Exception as err:  # noqa: BLE001
            raise OutputError(f"cannot delete {self.uri(path)}: {_short(err)}") from None

    def check_removal(self, path: str, within: str, protect: tuple[str, ...] | list[str] = ()) -> None:
        """Raise OutputError unless deleting `path` removes nothing outside the resolved folder `within` and
        nothing of `protect` (see `remove`). Where `path` itself lies counts: a symlink is deleted as a link."""
        here = self._spellings(path, follow=False)
        if not any(_inside(w, r) for w in here for r in self._spellings(within)):
            raise OutputError(
                f"refusing to delete {self.uri(path)}: it lies at {self.uri(self.location(path))}, outside the output "
                f"folder {self.uri(within)} (really {self.uri(self.resolved(within))}); point output.uri at a folder "
                "of its own"
            )
        for other in protect:
            if any(_inside(p, w) or _inside(w, p) for w in here for p in self._spellings(other)):
                raise OutputError(
                    f"refusing to delete {self.uri(path)}: it is, holds or lies in the job's input {self.uri(other)} "
                    "(compared where they really are, symlinks followed); point output.uri at a folder outside the "
                    "input"
                )

    def check_clearable(self, folder: str, protect: tuple[str, ...] | list[str] = ()) -> None:
        """Raise OutputError if the folder an overwrite empties is, holds or lies in any of `protect` (the job's
        inputs), compared where they really are (a symlinked or otherwise spelled output folder included)."""
        for other in protect:
            if self.overlaps(folder, other):
                really = self.resolved(folder)
                where = f" (really {self.uri(really)})" if really != folder.rstrip("/") else ""
                raise OutputError(
                    f"refusing to empty output folder {self.uri(folder)}{where}: it overlaps the job's input "
                    f"{self.uri(other)}; point output.uri at a folder outside the input"
                )

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


def credentials_to_environment(config: StorageConfig, joining_cluster: bool) -> StorageConfig:
    """For an entry point, before it starts a local Ray: S3 keys set in the config (deprecated) move into the
    standard AWS variables of this process, which the local Ray's workers inherit, and the config returned has
    none, so they are never written out or passed to Ray. A job joining a cluster cannot reach its workers that
    way without storing the keys in Ray's metadata: ConfigError."""
    if not config.has_credentials:
        return config
    from pipelines.errors import ConfigError

    if joining_cluster:
        raise ConfigError(
            "S3 keys in the config (storage.access_key_id / secret_access_key / session_token) cannot reach the "
            "workers of a cluster without being stored in Ray's metadata: remove them and set AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY (or a profile, an instance role, IRSA) in the cluster's environment"
        )
    log.warning(
        "storage.access_key_id / secret_access_key in a config file are deprecated: set AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY in the environment instead (this run moves them there)"
    )
    for name, env in StorageConfig.CREDENTIAL_ENV.items():
        value = getattr(config, name)
        if value is not None:
            os.environ[env] = value.get_secret_value()
    return config.without_credentials()


def _collapse(path: str) -> str:
    """An S3 path (bucket/key) with repeated slashes collapsed and trailing ones stripped."""
    parts = [p for p in path.split("/") if p]
    return "/".join(parts)


def _inside(path: str, folder: str) -> bool:
    """`path` is `folder` or lies inside it (both already resolved or normalised)."""
    if path == folder or not folder:  # "": a whole store (an S3 path normalised to nothing)
        return True
    return path.startswith(folder if folder.endswith("/") else folder + "/")


def _local_write(path: str, data: bytes, exclusive: bool) -> None:
    """The bytes to a hidden temporary name in the same folder, then one rename over `path` (or, `exclusive`, a
    hard link that raises FileExistsError if `path` exists): a reader never sees a half-written file."""
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
        opts["key"] = config.access_key_id.get_secret_value()
    if config.secret_access_key:
        opts["secret"] = config.secret_access_key.get_secret_value()
    if config.session_token:
        opts["token"] = config.session_token.get_secret_value()
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
