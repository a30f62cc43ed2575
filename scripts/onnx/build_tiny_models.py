"""Build the tiny ONNX models, tokenizer and expected outputs used by backfill-onnx's fast tests.

Writes into crates/onnx/tests/fixtures/ (or the folder given as the first argument):
  tiny_tokenizer.json   a BERT-style WordPiece tokenizer with a 64-entry vocabulary
  tiny_embedder.onnx    inputs input_ids, attention_mask, token_type_ids (int64 [batch, sequence]),
                        output last_hidden_state [batch, sequence, 8]
  tiny_classifier.onnx  same inputs, output logits [batch, 3]
  tiny_expected.json    texts and the outputs onnxruntime gives for them (mean-pooled,
                        L2-normalised embeddings; softmax probabilities)

Both models mix every token with the masked mean of the row's real tokens, so a wrong attention
mask or padding that leaks changes their outputs. Weights come from a fixed seed: re-running
gives the same files. Run with the venv of scripts/onnx/setup-venv.sh.
"""

import json
import pathlib
import sys

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer

HIDDEN = 8
CLASSES = 3
WORDS = (
    "de het een en van in op motie kamer regering verzoekt gehoord beraadslaging "
    "constaterende overwegende dat is niet wel voor met the a of to and motion house "
    "government requests wonen zorg klimaat onderwijs geld"
).split()
PIECES = ["##s", "##en", "##e", "##n", "##t", "##er"]
LETTERS = list("abcdefghijklmnopqrstuvwxyz")


def vocabulary():
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + WORDS + PIECES
    tokens += [letter for letter in LETTERS if letter not in tokens]
    tokens = tokens[:64]
    return {token: index for index, token in enumerate(tokens)}


def tokenizer_json(vocab):
    special = lambda token, index: {
        "id": index, "content": token, "single_word": False, "lstrip": False,
        "rstrip": False, "normalized": False, "special": True,
    }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [special(token, vocab[token]) for token in ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]],
        "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                       "strip_accents": None, "lowercase": True},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [vocab["[CLS]"]], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [vocab["[SEP]"]], "tokens": ["[SEP]"]},
            },
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": vocab},
    }


def shared_front(nodes, initializers, rng, vocab_size):
    """token states h [b, s, H] and the masked mean context c [b, 1, H]."""
    initializers += [
        numpy_helper.from_array(rng.normal(size=(vocab_size, HIDDEN)).astype(np.float32), "word_embeddings"),
        numpy_helper.from_array(rng.normal(size=(2, HIDDEN)).astype(np.float32), "type_embeddings"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axis_two"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis_one"),
        numpy_helper.from_array(np.array(1e-9, dtype=np.float32), "tiny"),
    ]
    nodes += [
        helper.make_node("Gather", ["word_embeddings", "input_ids"], ["words"], axis=0),
        helper.make_node("Gather", ["type_embeddings", "token_type_ids"], ["types"], axis=0),
        helper.make_node("Add", ["words", "types"], ["states"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_float"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_float", "axis_two"], ["mask_column"]),
        helper.make_node("Mul", ["states", "mask_column"], ["masked_states"]),
        helper.make_node("ReduceSum", ["masked_states", "axis_one"], ["state_sum"], keepdims=1),
        helper.make_node("ReduceSum", ["mask_column", "axis_one"], ["mask_sum"], keepdims=1),
        helper.make_node("Max", ["mask_sum", "tiny"], ["mask_count"]),
        helper.make_node("Div", ["state_sum", "mask_count"], ["context"]),
    ]


def model_inputs():
    return [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
            for name in ["input_ids", "attention_mask", "token_type_ids"]]


def save(graph, path):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="backfill-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def build_embedder(path, vocab_size):
    rng = np.random.default_rng(20261123)
    nodes, initializers = [], []
    shared_front(nodes, initializers, rng, vocab_size)
    initializers.append(numpy_helper.from_array(rng.normal(size=(HIDDEN, HIDDEN)).astype(np.float32) / 2, "mix"))
    nodes += [
        helper.make_node("Add", ["states", "context"], ["with_context"]),
        helper.make_node("MatMul", ["with_context", "mix"], ["mixed"]),
        helper.make_node("Tanh", ["mixed"], ["last_hidden_state"]),
    ]
    output = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])
    save(helper.make_graph(nodes, "tiny_embedder", model_inputs(), [output], initializers), path)


def build_classifier(path, vocab_size):
    rng = np.random.default_rng(20261124)
    nodes, initializers = [], []
    shared_front(nodes, initializers, rng, vocab_size)
    initializers += [
        numpy_helper.from_array(rng.normal(size=(HIDDEN, CLASSES)).astype(np.float32), "classifier_weight"),
        numpy_helper.from_array(rng.normal(size=(CLASSES,)).astype(np.float32), "classifier_bias"),
    ]
    nodes += [
        helper.make_node("Squeeze", ["context", "axis_one"], ["pooled"]),
        helper.make_node("MatMul", ["pooled", "classifier_weight"], ["scores"]),
        helper.make_node("Add", ["scores", "classifier_bias"], ["logits"]),
    ]
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])
    save(helper.make_graph(nodes, "tiny_classifier", model_inputs(), [output], initializers), path)


EXPECTED_TEXTS = [
    "De Kamer, gehoord de beraadslaging,",
    "verzoekt de regering",
    "Motion of the House about wonen en zorg",
    "xyz",
    "",
    "overwegende dat het klimaat niet wacht; constaterende dat onderwijs geld kost " * 3,
]


def expected_outputs(folder, max_length):
    tokenizer = Tokenizer.from_file(str(folder / "tiny_tokenizer.json"))
    tokenizer.enable_truncation(max_length)
    embedder = onnxruntime.InferenceSession(str(folder / "tiny_embedder.onnx"))
    classifier = onnxruntime.InferenceSession(str(folder / "tiny_classifier.onnx"))
    rows = []
    for text in EXPECTED_TEXTS:
        encoding = tokenizer.encode(text)
        feed = {
            "input_ids": np.array([encoding.ids], dtype=np.int64),
            "attention_mask": np.array([encoding.attention_mask], dtype=np.int64),
            "token_type_ids": np.array([encoding.type_ids], dtype=np.int64),
        }
        states = embedder.run(None, feed)[0][0]
        pooled = states.mean(axis=0)
        embedding = pooled / max(np.linalg.norm(pooled), 1e-12)
        logits = classifier.run(None, feed)[0][0]
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        rows.append({
            "text": text,
            "token_ids": encoding.ids,
            "embedding": [float(value) for value in embedding],
            "probabilities": [float(value) for value in probabilities],
        })
    return {"max_length": max_length, "labels": ["links", "midden", "rechts"], "rows": rows}


def main():
    default = pathlib.Path(__file__).resolve().parents[2] / "crates" / "onnx" / "tests" / "fixtures"
    folder = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else default
    folder.mkdir(parents=True, exist_ok=True)
    vocab = vocabulary()
    (folder / "tiny_tokenizer.json").write_text(json.dumps(tokenizer_json(vocab), indent=1) + "\n")
    build_embedder(folder / "tiny_embedder.onnx", len(vocab))
    build_classifier(folder / "tiny_classifier.onnx", len(vocab))
    expected = expected_outputs(folder, max_length=16)
    (folder / "tiny_expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    for name in ["tiny_tokenizer.json", "tiny_embedder.onnx", "tiny_classifier.onnx", "tiny_expected.json"]:
        print(f"{folder / name}: {(folder / name).stat().st_size} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
