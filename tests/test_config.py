"""Config validation: strict keys, named errors, overrides."""

from __future__ import annotations

import pytest

from pipelines.config import RerankJobConfig, load_config
from pipelines.errors import ConfigError

MINIMAL = """
input: {uri: data/in}
output: {uri: out}
model: {name_or_path: some/model}
"""


def write(tmp_path, text):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_minimal_config_gets_defaults(tmp_path):
    cfg = load_config(RerankJobConfig, write(tmp_path, MINIMAL))
    assert cfg.output.top_n == 10 and cfg.output.mode == "error" and cfg.model.kind == "cross-encoder"
    assert cfg.model.max_length == 512 and cfg.scale.num_actors == "auto" and cfg.input.corpus_uri is None


def test_overrides_reach_any_key(tmp_path):
    cfg = load_config(
        RerankJobConfig,
        write(tmp_path, MINIMAL),
        ["output.top_n=3", "model.kind=bi-encoder", "input.uri=[a, b]", "storage.endpoint_url=http://127.0.0.1:9"],
    )
    assert cfg.output.top_n == 3 and cfg.model.kind == "bi-encoder" and cfg.input.uri == ["a", "b"]
    assert cfg.storage.endpoint_url == "http://127.0.0.1:9"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["output.topn=3"], "output.topn: unknown key"),
        (["output.top_n=0"], "output.top_n: Input should be greater than or equal to 1"),
        (["output.mode=append"], "output.mode: Input should be 'error', 'overwrite' or 'resume'"),
        (["model.kind=colbert"], "model.kind"),
        (["model.max_length=abc"], "model.max_length"),
        (["model.query_template=hello"], "model.query_template: Value error, must contain the placeholder {query}"),
        (["scale.num_actors=2", "scale.max_actors=1"], "scale.max_actors must be >= scale.num_actors"),
        (["nonsense"], "expected key.path=value"),
    ],
)
def test_errors_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(RerankJobConfig, write(tmp_path, MINIMAL), overrides)
    assert message in str(err.value)


def test_missing_required_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="give the reranker as model, or several stages as cascade"):
        load_config(RerankJobConfig, write(tmp_path, "input: {uri: a}\noutput: {uri: b}\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(RerankJobConfig, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(RerankJobConfig, write(tmp_path, "input: [unclosed"))
