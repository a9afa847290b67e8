"""Entry point for `ray job submit`: the batch reranking job.

    ray job submit --working-dir . -- python jobs/rerank.py --config conf/rerank.yaml --set output.top_n=20
    python jobs/rerank.py --config conf/rerank.yaml --resume   # continue an interrupted job (a retried RayJob)

On a cluster RAY_ADDRESS is set by `ray job submit` and the job joins it; run directly it starts a local Ray.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a --working-dir upload has no installed package

from pipelines.cli import main


def parse(argv: list[str]) -> list[str]:
    p = argparse.ArgumentParser(description="Rerank Parquet candidates; top-N per query out (see docs/batch-job.md).")
    p.add_argument("--config", required=True, help="YAML job config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument(
        "--resume", action="store_true", help="continue an earlier run into the same output (rerank run --resume)"
    )
    args = p.parse_args(argv)
    return ["run", args.config, *[f"--set={o}" for o in args.overrides], *(["--resume"] if args.resume else [])]


if __name__ == "__main__":
    sys.exit(main(parse(sys.argv[1:])))
