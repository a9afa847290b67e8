# The rerank image: Ray's own image of the Ray version the project pins, with the project installed.
# One Dockerfile, two variants (the KubeRay manifests and cluster.yaml name these tags):
#   docker build -t rerank:0.1.0-ray2.60.0-cpu .
#   docker build --build-arg VARIANT=gpu -t rerank:0.1.0-ray2.60.0-gpu .     # CUDA: rayproject/ray:2.60.0-py311-gpu
# RAY_VERSION, PYTHON and TORCH_VERSION must match pyproject.toml and cluster.yaml (tests/test_deploy.py checks).
ARG RAY_VERSION=2.60.0
ARG PYTHON=py311
ARG VARIANT=cpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON}-${VARIANT}

ARG RAY_VERSION
ARG VARIANT
ARG TORCH_VERSION=2.13.0

# torch first and pinned: the CPU variant takes the CPU build (a bare torch would pull the multi-GB CUDA one), the
# GPU variant the default (CUDA) build from PyPI.
RUN if [ "$VARIANT" = "cpu" ]; then \
        pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu; \
    else \
        pip install --no-cache-dir "torch==${TORCH_VERSION}"; \
    fi

# As the image's user (ray), so that pip can build the project in place.
RUN mkdir -p /home/ray/rerank
WORKDIR /home/ray/rerank
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users pipelines/ pipelines/
COPY --chown=ray:users jobs/ jobs/
COPY --chown=ray:users conf/ conf/
# ray is pinned to the image's own version, so pip never replaces the Ray the image was built around.
RUN pip install --no-cache-dir ".[cpu-backends]" "ray[data,serve]==${RAY_VERSION}" "torch==${TORCH_VERSION}" \
    && python -c "import ray, torch, pipelines.cli; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"

# Models come from the hub at run time (HF_HOME on a volume keeps them across restarts) or from a mounted folder.
# TOKENIZERS_PARALLELISM=false: each task of the job's CPU stage reserves scale.prepare_cpus (1) CPU and tokenises one
# unit; Ray runs as many of them at once as the node has CPUs, which is where the parallelism comes from. A
# tokenizer fanning every batch out to all the node's cores as well would oversubscribe them.
ENV HF_HOME=/home/ray/.cache/huggingface \
    TOKENIZERS_PARALLELISM=false
