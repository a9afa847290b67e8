"""`ray job submit --working-dir . -- python jobs/serve.py conf/serve.yaml [--set KEY=VALUE ...]`

Thin entry point for a Ray cluster: the same as `rerank serve`. Inside a submitted job RAY_ADDRESS is set, so the
service joins the cluster (Serve's proxy binds serve.host:serve.port on the cluster's nodes) and, when the job is
stopped, deletes only its own application. For a long-lived deployment prefer `serve deploy
conf/serve_deploy.yaml`, which keeps running without a driver.
"""

import sys
from pathlib import Path

# Run from a checkout (`python jobs/serve.py`) as well as from an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
