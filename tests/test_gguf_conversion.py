"""A GGUF file converted tensor by tensor gives the folder transformers' whole-model conversion gives.

The file is the default model cut to two blocks (its Q4_1 and Q8_0 bytes as they are), so the
real dequantization, the query/key reordering of llama files and the tied output head are all
on the path.
"""

import json

import pytest
import torch

from llmtailor import gguf_conversion, models
from llmtailor.hw_profiles import llamacpp

pytestmark = pytest.mark.slow  # the default model's own quantized bytes


@pytest.fixture(scope="module")
def cut_gguf(tmp_path_factory):
    return llamacpp.write(models.default_model_path(), tmp_path_factory.mktemp("gguf") / "cut.gguf", blocks=2)


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


def _config(folder):
    config = json.loads((folder / "config.json").read_text())
    config.pop("transformers_version", None)
    return config


def test_tensor_by_tensor_gives_the_whole_conversions_model_bit_for_bit(cut_gguf, tmp_path, monkeypatch):
    by_tensor, whole = tmp_path / "by_tensor", tmp_path / "whole"
    by_tensor.mkdir()
    whole.mkdir()
    monkeypatch.setattr(gguf_conversion, "SHARD_BYTES", 4 << 20)  # several shards even for two blocks
    gguf_conversion.write(cut_gguf, by_tensor)
    gguf_conversion._write_whole(cut_gguf, whole)
    index = json.loads((by_tensor / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (by_tensor / "model.safetensors").exists()
    assert _config(by_tensor) == _config(whole)
    assert json.loads((by_tensor / "generation_config.json").read_text()) == \
        json.loads((whole / "generation_config.json").read_text())
    ours, theirs = _load(by_tensor).state_dict(), _load(whole).state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == torch.float32 and torch.equal(ours[name], tensor), name
    assert (by_tensor / "tokenizer.json").is_file()


def test_files_the_tensor_path_cannot_take_go_whole(cut_gguf, tmp_path, monkeypatch):
    # An architecture whose tensor processor assembles tensors from several (mixture-of-experts files)
    # (the whole-model path itself is the reference of the test above)
    monkeypatch.setattr(gguf_conversion, "BY_TENSOR", ())
    whole = []
    monkeypatch.setattr(gguf_conversion, "_write_whole", lambda path, folder: whole.append(folder))
    gguf_conversion.write(cut_gguf, tmp_path)
    assert whole == [tmp_path] and not (tmp_path / "model.safetensors.index.json").exists()
    monkeypatch.undo()
    # A file that lacks one of the model's weights: loading would initialise it at random, so nothing is written
    # tensor by tensor (transformers' conversion decides what to do with it).
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(cut_gguf)
    lacking = tmp_path / "lacking.gguf"
    writer = GGUFWriter(lacking, reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if not field.name.startswith("GGUF.") and field.name != "general.architecture":
            sub_type = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type)
    for tensor in reader.tensors:
        if tensor.name != "blk.1.ffn_up.weight":
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()
    folder = tmp_path / "lacking"
    folder.mkdir()
    assert gguf_conversion._write_by_tensor(lacking, folder) is False
    assert not any(folder.iterdir())


def test_the_kept_conversion_is_readable_by_the_caches_other_users(cut_gguf, tmp_path, monkeypatch):
    # transformers and safetensors write the weights 0600; a cache folder shared on a machine must not keep them so
    import os

    monkeypatch.setenv("LLMTAILOR_CACHE", str(tmp_path / "cache"))
    old = os.umask(0o022)
    try:
        folder = models._convert_gguf(cut_gguf, log=lambda line: None)
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o644}
    assert any(p.suffix == ".safetensors" for p in folder.iterdir())
