"""The compile cache key: every file that shapes an artifact, and nothing else."""

from relaxlm.cache import content_key


def test_onnx_key_covers_its_companion_files(tmp_path):
    onnx = tmp_path / "onnx" / "model.onnx"
    onnx.parent.mkdir()
    onnx.write_bytes(b"graph")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("not read by the frontend")
    key = content_key(onnx, {})
    (tmp_path / "notes.txt").write_text("changed")
    assert content_key(onnx, {}) == key
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0"}')
    assert content_key(onnx, {}) != key
    key = content_key(onnx, {})
    (onnx.parent / "model.onnx.data").write_bytes(b"external weights")
    assert content_key(onnx, {}) != key


def test_options_change_the_key(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert content_key(tmp_path, {"quant": "q4"}) != content_key(tmp_path, {"quant": "q8"})
