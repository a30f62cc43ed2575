"""Sentence embeddings with onnxruntime: the reference and the baseline for backfill-onnx.

  embed  --model M --tokenizer T --input TEXTS.jsonl --output OUT.jsonl [--max-length 256]
      One {"tokens": n, "embedding": [...]} line per input line ({"text": ...}): the
      tokenizer.json truncated at max-length (special tokens included), no padding, the
      model run one text at a time, mean pooling over the attention mask, L2 normalisation.

  bench  --model M --tokenizer T --input TEXTS.jsonl --threads N [--max-length 256]
         [--max-batch-tokens 256] [--rounds 2]
      Times the whole path (tokenise, batch, run, pool) over all input texts and prints one
      JSON object per configuration: onnxruntime with N intra-op threads over batches cut by
      the same padded-token budget after sorting by length, N single-threaded sessions
      running such batches in parallel, and the same with a budget of 8192 tokens (larger
      batches, onnxruntime's usual choice). Best round of each.
"""

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime
from tokenizers import Tokenizer


def load_tokenizer(path, max_length):
    tokenizer = Tokenizer.from_file(path)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    return tokenizer


def session(model, threads):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def feed_for(encodings, input_names):
    length = max(len(encoding.ids) for encoding in encodings)
    shape = (len(encodings), length)
    ids = np.zeros(shape, dtype=np.int64)
    mask = np.zeros(shape, dtype=np.int64)
    types = np.zeros(shape, dtype=np.int64)
    for row, encoding in enumerate(encodings):
        count = len(encoding.ids)
        ids[row, :count] = encoding.ids
        mask[row, :count] = 1
        types[row, :count] = encoding.type_ids
    values = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {name: values[name] for name in input_names}, mask


def embed_batch(ort_session, input_names, encodings):
    feed, mask = feed_for(encodings, input_names)
    states = ort_session.run(None, feed)[0]
    weights = mask[:, :, None].astype(np.float32)
    pooled = (states * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return pooled / norms


def plan_batches(lengths, max_batch_tokens):
    """Longest first, greedy under rows × padded length ≤ budget (as backfill-onnx plans)."""
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    batches, current, padded = [], [], 0
    for index in order:
        length = max(lengths[index], 1)
        if current and (len(current) + 1) * max(padded, length) > max_batch_tokens:
            batches.append(current)
            current, padded = [], 0
        current.append(index)
        padded = max(padded, length)
    if current:
        batches.append(current)
    return batches


def read_texts(path):
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line)["text"] for line in lines if line.strip()]


def command_embed(arguments):
    tokenizer = load_tokenizer(arguments.tokenizer, arguments.max_length)
    ort_session = session(arguments.model, arguments.threads)
    input_names = [model_input.name for model_input in ort_session.get_inputs()]
    with open(arguments.output, "w", encoding="utf-8") as output:
        for text in read_texts(arguments.input):
            encoding = tokenizer.encode(text)
            embedding = embed_batch(ort_session, input_names, [encoding])[0]
            row = {"tokens": len(encoding.ids), "embedding": [float(value) for value in embedding]}
            output.write(json.dumps(row) + "\n")


def run_intra_op(arguments, texts, tokenizer):
    ort_session = session(arguments.model, arguments.threads)
    input_names = [model_input.name for model_input in ort_session.get_inputs()]
    def once():
        encodings = tokenizer.encode_batch(texts)
        batches = plan_batches([len(encoding.ids) for encoding in encodings], arguments.max_batch_tokens)
        for batch in batches:
            embed_batch(ort_session, input_names, [encodings[index] for index in batch])
    return once


def run_parallel_sessions(arguments, texts, tokenizer, max_batch_tokens=None):
    max_batch_tokens = max_batch_tokens or arguments.max_batch_tokens
    ort_session = session(arguments.model, 1)
    input_names = [model_input.name for model_input in ort_session.get_inputs()]
    pool = ThreadPoolExecutor(max_workers=arguments.threads)
    def once():
        encodings = tokenizer.encode_batch(texts)
        batches = plan_batches([len(encoding.ids) for encoding in encodings], max_batch_tokens)
        work = lambda batch: embed_batch(ort_session, input_names, [encodings[index] for index in batch])
        list(pool.map(work, batches))
    return once


def command_bench(arguments):
    texts = read_texts(arguments.input)
    tokenizer = load_tokenizer(arguments.tokenizer, arguments.max_length)
    configurations = [
        (f"onnxruntime {onnxruntime.__version__}, intra-op threads={arguments.threads}", run_intra_op),
        (f"onnxruntime {onnxruntime.__version__}, {arguments.threads} sessions in parallel", run_parallel_sessions),
    ]
    if arguments.max_batch_tokens != 8192:
        configurations.append((
            f"onnxruntime {onnxruntime.__version__}, {arguments.threads} sessions, budget 8192",
            lambda arguments, texts, tokenizer: run_parallel_sessions(arguments, texts, tokenizer, 8192),
        ))
    for name, build in configurations:
        once = build(arguments, texts, tokenizer)
        rounds = []
        for _ in range(arguments.rounds):
            started = time.perf_counter()
            once()
            rounds.append(time.perf_counter() - started)
        print(json.dumps({"name": name, "items": len(texts), "seconds": min(rounds), "rounds": rounds}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["embed", "bench"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-batch-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    arguments = parser.parse_args()
    if arguments.command == "embed":
        if not arguments.output:
            sys.exit("embed needs --output")
        command_embed(arguments)
    else:
        command_bench(arguments)


if __name__ == "__main__":
    main()
