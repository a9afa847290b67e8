"""Flaky S3: Storage's listing, reads and writes through a fault-injecting proxy in front of moto (tests/s3_faults.py).

Transient faults (503 SlowDown, 500 InternalError, connection reset, a reply slower than the read timeout) are
retried and the operation succeeds; a persistent one ends, within a bounded time, in a one-line InputError or
OutputError that names the URI. No Ray here: Ray workers use the same s3fs options (`storage.s3_options`).
"""

from __future__ import annotations

import io
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from pipelines.config import StorageConfig
from pipelines.errors import InputError, OutputError
from pipelines.io.storage import Storage, s3_options

pytestmark = pytest.mark.timeout(120)

BUCKET = "flaky"
TABLE = pa.table({"query_id": [1, 1, 2], "doc_id": ["a", "b", "c"], "text": ["x", "y", "z"]})


@pytest.fixture(scope="module")
def bucket(s3_server):
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, key="testing", secret="testing", use_listings_cache=False)
    fs.mkdir(BUCKET)
    for i in range(2):
        buf = io.BytesIO()
        pq.write_table(TABLE, buf)
        fs.pipe(f"{BUCKET}/in/part-{i}.parquet", buf.getvalue())
    return fs


def _storage(proxy, retries: int = 3) -> Storage:
    config = StorageConfig(endpoint_url=proxy.endpoint, retries=retries, connect_timeout_s=2, read_timeout_s=1)
    return Storage.for_uri(f"s3://{BUCKET}/", config)


IN = f"{BUCKET}/in/part-0.parquet"
# name -> (method and path pattern of the requests to fault, the operation, a check of its result)
OPS = {
    "list": ("GET", r"list-type=2", lambda st: st.list_parquet(f"s3://{BUCKET}/in/"), lambda r: len(r) == 2),
    "schema": ("GET", rf"/{IN}", lambda st: st.read_schema(IN), lambda r: r.names == TABLE.schema.names),
    "column": ("GET", rf"/{IN}", lambda st: st.read_column(IN, "doc_id"), lambda r: r.to_pylist() == ["a", "b", "c"]),
    "open": ("GET", rf"/{IN}", lambda st: st.fs.open(IN, "rb").read(), lambda r: pq.read_table(pa.py_buffer(r)) == TABLE),
    "write_json": (
        "PUT",
        rf"/{BUCKET}/out/",
        lambda st: st.write_json(f"{BUCKET}/out/_summary.json", {"ok": 1}),
        lambda r: r is None,
    ),
    "write_parquet": (
        "PUT",
        rf"/{BUCKET}/out/",
        lambda st: st.write_parquet(f"{BUCKET}/out/parts/part-0.parquet", TABLE),
        lambda r: r is None,
    ),
    "list_names": ("GET", r"list-type=2", lambda st: st.list_names(f"{BUCKET}/out/parts", ".parquet"), lambda r: r == ["part-0.parquet"]),
    "read_json": ("GET", rf"/{BUCKET}/out/_summary.json", lambda st: st.read_json(f"{BUCKET}/out/_summary.json"), lambda r: r == {"ok": 1}),
}  # fmt: skip


@pytest.mark.parametrize("kind", ["slowdown", "internal", "reset", "delay"])
def test_transient_faults_are_retried(bucket, s3_fault_proxy, kind):
    """Two faults in a row on every operation's own requests: each operation still succeeds."""
    storage = _storage(s3_fault_proxy)
    for name, (method, path, op, ok) in OPS.items():
        s3_fault_proxy.clear()
        rule = s3_fault_proxy.inject(kind, times=2, method=method, path=path, delay_s=2.0)
        result = op(storage)
        assert ok(result), (name, result)
        assert rule.injected == 2, (name, s3_fault_proxy.seen)
    written = bucket.cat(f"{BUCKET}/out/_summary.json")
    assert b'"ok": 1' in written


PERSISTENT = [
    ("list", InputError, f"cannot list s3://{BUCKET}/in/"),
    ("schema", InputError, f"s3://{IN}"),
    ("column", InputError, f"s3://{IN}"),
    ("write_json", OutputError, f"cannot write s3://{BUCKET}/out/_summary.json"),
    ("write_parquet", OutputError, f"cannot write s3://{BUCKET}/out/parts/part-0.parquet"),
    ("list_names", OutputError, f"cannot list s3://{BUCKET}/out/parts"),
    ("read_json", OutputError, f"cannot read s3://{BUCKET}/out/_summary.json"),
]


@pytest.mark.parametrize(("name", "error", "uri"), PERSISTENT, ids=[p[0] for p in PERSISTENT])
def test_persistent_fault_is_one_line_naming_the_uri(bucket, s3_fault_proxy, name, error, uri):
    method, path, op, _ = OPS[name]
    s3_fault_proxy.clear()
    rule = s3_fault_proxy.inject("internal", times=None, method=method, path=path)
    storage = _storage(s3_fault_proxy, retries=2)
    start = time.monotonic()
    with pytest.raises(error) as info:
        op(storage)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert uri in message and "\n" not in message, message
    assert "internal error" in message.lower(), message
    assert rule.injected >= 3  # the first try and botocore's 2 retries
    assert elapsed < 60


def test_persistent_slowdown_gives_up(bucket, s3_fault_proxy):
    """Throttling is retried by both botocore and s3fs (so more attempts), and still ends with the URI."""
    s3_fault_proxy.clear()
    rule = s3_fault_proxy.inject("slowdown", times=None, method="GET", path="list-type=2")
    with pytest.raises(InputError, match=f"cannot list s3://{BUCKET}/in/.*reduce your request rate"):
        _storage(s3_fault_proxy, retries=1).list_parquet(f"s3://{BUCKET}/in/")
    assert rule.injected >= 2


def test_s3_options_retry_and_timeouts():
    opts = s3_options(StorageConfig(retries=7, connect_timeout_s=3, read_timeout_s=20))
    assert opts["config_kwargs"] == {
        "retries": {"max_attempts": 7, "mode": "standard"},
        "connect_timeout": 3,
        "read_timeout": 20,
    }


def test_fault_proxy_counts_and_passes_through(bucket, s3_fault_proxy):
    """The proxy itself: unmatched requests reach moto unchanged; rules answer only their first `times`."""
    s3_fault_proxy.clear()
    rule = s3_fault_proxy.inject("internal", times=1, method="HEAD")
    fs = s3fs.S3FileSystem(
        endpoint_url=s3_fault_proxy.endpoint,
        key="testing",
        secret="testing",
        use_listings_cache=False,
        skip_instance_cache=True,
        config_kwargs={"retries": {"max_attempts": 0, "mode": "standard"}},
    )
    with pytest.raises(OSError):
        fs.info(IN)
    assert fs.info(IN)["size"] == bucket.info(IN)["size"]
    assert rule.injected == 1 and s3_fault_proxy.injected() == 1
    assert [s.action for s in s3_fault_proxy.seen][:2] == ["internal", "forwarded"]
