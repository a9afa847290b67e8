"""`ray job submit --working-dir . -- python jobs/eval.py conf/eval_cranfield.yaml [--set KEY=VALUE ...]`

Thin entry point for a Ray cluster: the same as `rerank eval`. Inside a submitted job RAY_ADDRESS is set, so
the evaluation joins the cluster instead of starting one. The report folder is written on the driver's disk.
"""

import sys
from pathlib import Path

# Run from a checkout (`python jobs/eval.py`) as well as from an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
