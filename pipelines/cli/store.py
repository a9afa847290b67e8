"""`rerank store compact URI [--keep-namespace NS ...]`: merge a score store's small files, drop namespaces."""

from __future__ import annotations

import argparse
import logging
from typing import Any

log = logging.getLogger(__name__)


def _args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="store_command", required=True)
    c = sub.add_parser(
        "compact",
        help="merge each partition's files into one; drop namespaces not kept",
        description="Merge each partition's files into one file (sorted, row groups by query) and delete the files "
        "merged, never others: safe while jobs write to the store. With --keep-namespace, every other namespace "
        "is deleted. Files that cannot be used (truncated, another namespace) are removed.",
    )
    c.add_argument("uri", help="the store's folder (local or s3://), as output.score_store names it")
    c.add_argument(
        "--keep-namespace",
        dest="keep",
        action="append",
        default=None,
        metavar="NAMESPACE",
        help="keep this namespace (repeat for several; see _summary.json's score_store.namespace); others go",
    )


def _cmd(args: argparse.Namespace) -> int:
    from pipelines.io.score_store import compact

    report = compact(args.uri, keep=args.keep)
    print(
        f"rerank: store {args.uri}: {len(report.namespaces_kept)} namespace(s) kept, "
        f"{len(report.namespaces_dropped)} dropped; {report.files_merged:,} files merged into "
        f"{report.files_written:,}; {report.bad_files_removed:,} unusable file(s) removed; "
        f"{report.bytes_before:,} -> {report.bytes_after:,} bytes in the namespaces kept"
    )
    return 0


def register_cli(commands: dict[str, Any], _add_config_args: Any = None) -> None:
    commands["store"] = ("manage a score store (output.score_store): compact", _args, _cmd)
