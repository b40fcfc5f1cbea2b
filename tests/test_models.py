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


def test_a_gguf_conversion_is_kept_by_content_so_a_copy_elsewhere_reuses_it(tmp_path, monkeypatch):
    import hashlib
    import os

    monkeypatch.setenv("LLMTAILOR_CACHE", str(tmp_path / "cache"))
    paths = {}
    for name, content in (("a", b"x" * 1000), ("b", b"x" * 1000), ("other", b"y" * 1000)):
        paths[name] = tmp_path / name / "model.gguf"
        paths[name].parent.mkdir()
        paths[name].write_bytes(content)
    kept = models._converted_gguf_dir(paths["a"])
    assert not (tmp_path / "cache" / "gguf").exists()  # nothing converted yet: nothing written
    kept.mkdir(parents=True)  # as a conversion would
    assert models._converted_gguf_dir(paths["a"]) == kept
    assert len(list((tmp_path / "cache" / "gguf" / ".digests").iterdir())) == 1  # hashed once for this path
    assert kept.parent == tmp_path / "cache" / "gguf" and kept.name.startswith("model-")
    assert models._converted_gguf_dir(paths["b"]) == kept  # another path, the same file: one conversion
    assert models._converted_gguf_dir(paths["other"]) != kept
    paths["a"].write_bytes(b"z" * 1000)  # changed in place: a new key
    os.utime(paths["a"], ns=(1, 1))
    assert models._converted_gguf_dir(paths["a"]) != kept
    # A conversion kept under the older key (path, size, modification time) is renamed, not converted again.
    stat = paths["other"].stat()
    stamp = f"{paths['other'].resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    older = tmp_path / "cache" / "gguf" / f"model-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}"
    older.mkdir()
    (older / "config.json").write_text("{}")
    target = models._converted_gguf_dir(paths["other"])
    assert (target / "config.json").is_file() and older.is_symlink()  # a sweep of the older version reads on
    assert (older / "config.json").read_text() == "{}" and models._converted_gguf_dir(paths["other"]) == target
    from llmtailor import cache

    listed = {e.path.name: e.bytes for e in cache.entries(["gguf"])}
    assert listed[older.name] == 0 and listed[target.name] == 2  # counted once
    assert ".digests" not in listed  # bookkeeping, not an entry
    cache.clear(["gguf"])
    assert not any((tmp_path / "cache" / "gguf").iterdir())
