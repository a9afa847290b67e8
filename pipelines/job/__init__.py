"""The batch job: a folder of its stages.

- ``plan``: validate a job without Ray (inputs, layout, model, output), its fingerprint, the output's lease;
- ``join``: the corpus join, when candidates carry no text (Ray Data);
- ``stages``: the job's CPU stages around the engine's model stage (``pipelines.engine.model_stage``): read +
  tokenise a unit, commit a unit;
- ``reduce``: the units' partial top-N -> the final top-N, checked;
- ``run``: the wiring of one model's job (``run_job``);
- ``cascade``: several models, each over what the one before kept (``run_cascade``); ``run_rerank`` runs either;
- ``summary``: what a job reports.
"""

from pipelines.job.cascade import run_rerank
from pipelines.job.plan import JobPlan, OutputChanged, hold_output, plan_and_hold, plan_rerank
from pipelines.job.summary import JobError, JobSummary

__all__ = [
    "JobError",
    "JobPlan",
    "JobSummary",
    "OutputChanged",
    "hold_output",
    "plan_and_hold",
    "plan_rerank",
    "run_rerank",
]
