"""Tests of qalora_export.formats.onnx.genai: the ``genai_config.json`` onnxruntime-genai loads.

Unit checks of :func:`genai_config` on config dicts (geometry, token ids and their precedence, search
defaults), :func:`write_genai_config` as a file, then an exported tiny model: the names in the config
are the graph's inputs and outputs, the geometry is the graph's KV shapes, and onnxruntime-genai
accepts the directory and generates what a plain onnxruntime greedy loop generates.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import tiny_models

from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.formats.onnx.decoder import decoder_config
from qalora_export.formats.onnx.genai import genai_config, write_genai_config
from qalora_export.formats.onnx.spec import GENAI_CONFIG_FILE, MODEL_FILE

LLAMA = {"model_type": "llama", "hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2,
         "num_hidden_layers": 3, "intermediate_size": 160, "vocab_size": 211, "max_position_embeddings": 384,
         "rms_norm_eps": 1e-5, "hidden_act": "silu", "bos_token_id": 5, "eos_token_id": 6, "pad_token_id": 7}

SEARCH_DEFAULTS = {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
                   "past_present_share_buffer": False, "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1,
                   "top_p": 1.0}


def config_for(model_config: dict, generation_config: dict | None = None) -> dict:
    return genai_config(decoder_config(model_config), model_config, generation_config)


# ----------------------------------------------------------------------------------- genai_config


def test_decoder_geometry_names_and_token_ids():
    cfg = config_for(LLAMA)
    model, decoder = cfg["model"], cfg["model"]["decoder"]
    assert model["type"] == "llama"
    assert model["context_length"] == 384 and model["vocab_size"] == 211
    assert (model["bos_token_id"], model["eos_token_id"], model["pad_token_id"]) == (5, 6, 7)
    assert decoder["filename"] == MODEL_FILE == "model.onnx"
    assert decoder["num_hidden_layers"] == 3
    assert decoder["num_attention_heads"] == 6 and decoder["num_key_value_heads"] == 2
    assert decoder["head_size"] == 96 // 6 and decoder["hidden_size"] == 96
    assert decoder["inputs"] == {"input_ids": "input_ids", "attention_mask": "attention_mask",
                                 "past_key_names": "past_key_values.%d.key",
                                 "past_value_names": "past_key_values.%d.value"}
    assert "position_ids" not in decoder["inputs"]  # rotary positions come from the mask inside GQA
    assert decoder["outputs"] == {"logits": "logits", "present_key_names": "present.%d.key",
                                  "present_value_names": "present.%d.value"}
    assert decoder["session_options"]["provider_options"] == []
    search = cfg["search"]
    assert search["max_length"] == 384
    assert {k: v for k, v in search.items() if k != "max_length"} == SEARCH_DEFAULTS
    json.dumps(cfg)  # JSON-able as is


def test_head_dim_kv_heads_and_context_length_defaults():
    explicit = {**LLAMA, "head_dim": 32}  # not hidden / heads: the config's head_dim wins
    assert config_for(explicit)["model"]["decoder"]["head_size"] == 32
    mha = {k: v for k, v in LLAMA.items() if k not in ("num_key_value_heads", "max_position_embeddings")}
    cfg = config_for(mha)
    assert cfg["model"]["decoder"]["num_key_value_heads"] == 6  # no GQA: kv heads = heads
    assert cfg["model"]["context_length"] == cfg["search"]["max_length"] == 4096


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_model_type_is_carried(model_type):
    assert config_for({**LLAMA, "model_type": model_type})["model"]["type"] == model_type


def test_generation_config_ids_win_over_config_json():
    gen = {"bos_token_id": 11, "eos_token_id": [6, 12], "pad_token_id": None, "temperature": 0.7}
    model = config_for(LLAMA, gen)["model"]
    assert (model["bos_token_id"], model["eos_token_id"], model["pad_token_id"]) == (11, [6, 12], 7)
    cfg = config_for(LLAMA, gen)
    assert cfg["search"]["temperature"] == 1.0  # sampling settings are not taken from generation_config


@pytest.mark.parametrize(("model_ids", "gen", "expected"), [
    ({"bos_token_id": 5, "eos_token_id": 6}, None, (5, 6, 6)),  # no pad: pad is the eos
    ({"bos_token_id": 5, "eos_token_id": [9, 6]}, None, (5, [9, 6], 9)),  # several eos: the first
    ({"bos_token_id": 5, "eos_token_id": 6}, {"eos_token_id": [8, 6]}, (5, [8, 6], 8)),
    ({"bos_token_id": 5, "eos_token_id": 6}, {"pad_token_id": 0}, (5, 6, 0)),  # pad 0 is a pad, not "none"
    ({"bos_token_id": 5, "eos_token_id": 6}, {"pad_token_id": None, "bos_token_id": None}, (5, 6, 6)),
])
def test_pad_falls_back_to_the_first_eos(model_ids, gen, expected):
    base = {k: v for k, v in LLAMA.items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id")}
    model = config_for({**base, **model_ids}, gen)["model"]
    assert (model["bos_token_id"], model["eos_token_id"], model["pad_token_id"]) == expected


def test_inputs_are_not_modified():
    model_config, gen = copy.deepcopy(LLAMA), {"eos_token_id": [6, 12]}
    config_for(model_config, gen)
    assert model_config == LLAMA and gen == {"eos_token_id": [6, 12]}


def test_write_genai_config_writes_json_that_round_trips(tmp_path):
    gen = {"eos_token_id": [6, 12]}
    path = write_genai_config(tmp_path, decoder_config(LLAMA), LLAMA, gen)
    assert path == tmp_path / GENAI_CONFIG_FILE and GENAI_CONFIG_FILE == "genai_config.json"
    text = path.read_text()
    assert text.endswith("}\n")
    assert json.loads(text) == config_for(LLAMA, gen)
    assert [p.name for p in tmp_path.iterdir()] == [GENAI_CONFIG_FILE]
    # overwriting a stale file replaces it completely
    path.write_text("x" * 100_000)
    write_genai_config(tmp_path, decoder_config(LLAMA), LLAMA, None)
    assert json.loads(path.read_text()) == config_for(LLAMA)


# ----------------------------------------------------------------------------------- an exported model


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_models.make_tiny_base(tmp_path_factory.mktemp("genai") / "base", bits=4, group_size=32, layers=3,
                                      kv_heads=2, heads=4)


@pytest.fixture(scope="module")
def exported(base, tmp_path_factory) -> Path:
    from qalora_export.formats import get_format

    out = tmp_path_factory.mktemp("genai-out") / "onnx"
    get_format("onnx").export(MergedView.open(base), out)
    return out


def test_exported_config_matches_the_bases_configs(base, exported):
    model_config = json.loads((base / "config.json").read_text())
    generation = json.loads((base / "generation_config.json").read_text())
    cfg = json.loads((exported / GENAI_CONFIG_FILE).read_text())
    assert cfg == genai_config(decoder_config(model_config), model_config, generation)
    model = cfg["model"]
    assert model["type"] == "llama" and model["vocab_size"] == tiny_models.TINY_VOCAB
    assert model["context_length"] == model_config["max_position_embeddings"] == 256
    assert model["decoder"]["num_hidden_layers"] == 3
    assert model["decoder"]["num_attention_heads"] == 4 and model["decoder"]["num_key_value_heads"] == 2
    assert model["decoder"]["head_size"] == 64 // 4
    assert (model["bos_token_id"], model["eos_token_id"], model["pad_token_id"]) == (1, 2, 3)
    assert (exported / model["decoder"]["filename"]).is_file()


def test_config_names_are_the_graphs_inputs_and_outputs(exported):
    import onnx

    cfg = json.loads((exported / GENAI_CONFIG_FILE).read_text())["model"]["decoder"]
    proto = onnx.load(str(exported / cfg["filename"]), load_external_data=False)
    inputs = {i.name: i for i in proto.graph.input}
    outputs = {o.name: o for o in proto.graph.output}
    n = cfg["num_hidden_layers"]
    past = [cfg["inputs"][k] % i for i in range(n) for k in ("past_key_names", "past_value_names")]
    present = [cfg["outputs"][k] % i for i in range(n) for k in ("present_key_names", "present_value_names")]
    assert list(inputs) == [cfg["inputs"]["input_ids"], cfg["inputs"]["attention_mask"], *past]
    assert list(outputs) == [cfg["outputs"]["logits"], *present]
    for name in past + present:  # [batch, kv_heads, sequence, head_dim]
        dims = (inputs.get(name) or outputs.get(name)).type.tensor_type.shape.dim
        assert len(dims) == 4
        assert dims[1].dim_value == cfg["num_key_value_heads"] and dims[3].dim_value == cfg["head_size"], name
    logits = outputs[cfg["outputs"]["logits"]].type.tensor_type.shape.dim
    assert logits[2].dim_value == tiny_models.TINY_VOCAB


def test_onnxruntime_genai_accepts_and_runs_the_export(exported):
    og = pytest.importorskip("onnxruntime_genai")
    from qalora_export.formats.onnx.runtime import OrtDecoder, genai_greedy

    og.Config(str(exported))  # parses genai_config.json (unknown or mistyped fields raise)
    og.Model(og.Config(str(exported)))
    prompt = [1, 5, 9, 20, 33, 4, 7]  # no pad (3): onnxruntime-genai masks pad tokens in prompts
    ours = OrtDecoder(exported, providers=["CPUExecutionProvider"], threads=1).greedy(prompt, 6, eos=[2])
    theirs = genai_greedy(exported, prompt, 6)
    assert theirs == [t for t in ours if t != 2]  # genai ends at eos without returning it
    assert len(theirs) >= 1 and all(0 <= t < tiny_models.TINY_VOCAB for t in theirs)


def test_export_takes_token_ids_from_generation_config(base, tmp_path):
    from qalora_export.formats import get_format

    edited = tmp_path / "base"
    shutil.copytree(base, edited)
    gen_path = edited / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen.update(eos_token_id=[2, 9], bos_token_id=4)
    gen_path.write_text(json.dumps(gen))
    out = tmp_path / "onnx"
    get_format("onnx").export(MergedView.open(edited), out)
    model = json.loads((out / GENAI_CONFIG_FILE).read_text())["model"]
    assert (model["bos_token_id"], model["eos_token_id"], model["pad_token_id"]) == (4, [2, 9], 3)
    og = pytest.importorskip("onnxruntime_genai")
    og.Config(str(out))  # a list of eos ids is accepted too
