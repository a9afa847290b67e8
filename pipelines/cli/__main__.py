"""`python -m pipelines.cli ...`: what `rerank submit` runs on the cluster."""

import sys

from pipelines.cli import main

sys.exit(main())
