import pytest

from llmtailor import arch as arch_mod
from llmtailor import models
from llmtailor.errors import UserError


def test_local_folder_loads_with_its_architecture(tiny, tiny_model_dir):
    a = tiny.arch
    assert (a.num_layers, a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim) == (4, 64, 4, 2, 16)
    assert a.tie_embeddings and a.vocab_size == 512 and a.intermediate_size == 160
    assert len(a.linears) == 4 * 7
    assert a.linear("model.layers.2.self_attn.k_proj").out_features == 2 * 16
    assert a.total_params == sum(p.numel() for p in tiny.model.parameters())
    assert not tiny.model.training
    from_config, _ = models.load_architecture(str(tiny_model_dir))
    assert from_config == a
    assert arch_mod.Architecture.from_dict(a.to_dict()) == a


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        models.resolve(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="does not exist"):
        models.resolve("./nope.gguf")


def test_not_a_model_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="not a .gguf"):
        models.resolve(str(tmp_path / "notes.txt"))
    with pytest.raises(UserError, match="no config.json"):
        models.resolve(str(tmp_path))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF but not really")
    with pytest.raises(UserError, match="broken.gguf is truncated or not a valid GGUF file") as caught:
        models.load_config(str(broken))
    assert "offline" not in str(caught.value)


def test_hub_id_without_network_or_cache_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="could not load model 'no-such-org/no-such-model'"):
        models.load_config("no-such-org/no-such-model")
