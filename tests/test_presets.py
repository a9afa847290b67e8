"""The model presets in conf/models/ are valid model sections, and the one-string presets tokenise as their model
cards' recipes do (tiny models of the same tokenizer layout, built in tests/families.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines.config import ModelConfig, validate_config
from pipelines.model.encoding import PairEncoder, PromptCrossEncoderPairs
from pipelines.scoring import Scorer
from tests import families

CONF = Path(__file__).resolve().parents[1] / "conf" / "models"
PRESETS = sorted(p.stem for p in CONF.glob("*.yaml"))


def _preset(name: str) -> ModelConfig:
    return validate_config(ModelConfig, yaml.safe_load((CONF / f"{name}.yaml").read_text())["model"], name)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_is_a_valid_model_section(name):
    cfg = _preset(name)
    assert cfg.name_or_path and "/" in cfg.name_or_path  # a hub id a user can pull


def test_the_nemotron_preset_is_the_nvidia_recipe(tmp_path):
    cfg = _preset("llama-nemotron-rerank-1b-v2")
    assert cfg.kind == "cross-encoder" and cfg.trust_remote_code and cfg.activation == "none"
    assert cfg.prompt_template == families.LLAMA_PROMPT == "question:{query} \n \n passage:{text}"
    assert (cfg.max_length, cfg.padding_side) == (512, "left")
    model = families.build_llama_bidirectional(tmp_path / "llama")
    local = cfg.model_copy(update={"name_or_path": str(model), "dtype": "float32"})
    encoder = PairEncoder(local)
    assert isinstance(encoder, PromptCrossEncoderPairs) and encoder.padding_side == "left"
    pairs = families.cranfield_pairs(n=24)
    queries, passages = pairs["query"].tolist(), pairs["text"].tolist()
    texts = [cfg.prompt_template.format(query=q, text=p) for q, p in zip(queries, passages)]
    want = encoder.tokenizer(texts, truncation=True, max_length=512)["input_ids"]
    got = encoder.encode(queries, passages)
    by_pair = {int(p): ids for p, ids in zip(got.unit_pair, got.input_ids)}
    assert [by_pair[i] for i in range(len(texts))] == want
    bos = encoder.tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    assert all(ids.count(bos) == 1 and ids[0] == bos for ids in want)  # one <|begin_of_text|>, in front
    ref = families.transformers_reference(model, texts, max_length=512, trust_remote_code=True)
    np.testing.assert_allclose(Scorer(local).score(queries, passages), ref, atol=1e-4)


def test_the_qwen3_seq_cls_preset_is_the_one_string_recipe():
    cfg = _preset("qwen3-reranker-seq-cls")
    assert cfg.kind == "cross-encoder" and cfg.instruction == families.QWEN_INSTRUCTION
    assert (
        cfg.prompt_template.format(instruction=cfg.instruction, query="{query}", text="{text}") == families.QWEN_PROMPT
    )


def test_a_bert_one_string_prompt_is_built_from_its_parts_exactly():
    """BERT's pre-tokenizer splits at whitespace and punctuation, so a prompt's tokens are its parts' tokens: the
    encoder tokenizes each distinct query and passage once (as the pair path does) and the ids equal
    tokenizer(prompt) for every pair that fits."""
    path = str(families.minilm_path())
    cfg = ModelConfig(name_or_path=path, max_length=512, prompt_template=families.LLAMA_PROMPT)
    encoder = PairEncoder(cfg)
    assert encoder.composable
    pairs = families.cranfield_pairs(n=200)
    queries, passages = pairs["query"].tolist(), pairs["text"].tolist()
    texts = [cfg.prompt_template.format(query=q, text=p) for q, p in zip(queries, passages)]
    want = encoder.tokenizer(texts)["input_ids"]
    got = encoder.encode(queries, passages)
    by_pair = {int(p): ids for p, ids in zip(got.unit_pair, got.input_ids)}
    fits = [i for i, w in enumerate(want) if len(w) <= 512]
    assert len(fits) == len(texts)
    assert [by_pair[i] for i in fits] == [want[i] for i in fits]
