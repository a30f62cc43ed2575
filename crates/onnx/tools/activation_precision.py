"""How far rounding the linear layers' activations moves MiniLM's embeddings, under onnxruntime.

  python activation_precision.py --model M --tokenizer T --motions MOTIONS.jsonl [--items 200]

Every MatMul whose second input is a weight-only int8 weight (Cast then Mul of an int8
initializer) gets its activation input rounded first, in one of these ways (a copy of the model
per way, written next to this run in a temporary folder):

  bf16             to bfloat16 (Cast there and back: round to nearest even)
  int8-row         symmetric int8 per row (scale max|x| / 127 over the last axis)
  int8-row-asym    asymmetric 8-bit per row (min..max over the last axis in 255 steps)
  int8-tensor      symmetric int8 over the whole tensor (onnxruntime's dynamic quantisation)

and the lowest, mean and 1st-percentile cosine of each text's embedding (mean pooling, L2) with
the unchanged model's are printed: the precision each kernel family (vdpbf16ps; vpdpbusd)
would cost before any of it is written. `motions_reference` requires a cosine of 0.999.
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../../scripts/onnx"))
import reference_embeddings as reference  # noqa: E402


def rounded_model(source, target, way):
    model = onnx.load(source)
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    initializers = {initializer.name for initializer in graph.initializer}

    def is_int8_weight(name):
        node = producers.get(name)
        cast = producers.get(node.input[0]) if node is not None and node.op_type == "Mul" else None
        return cast is not None and cast.op_type == "Cast" and cast.input[0] in initializers

    for name, value in [("round_127", 127.0), ("round_255", 255.0), ("round_tiny", 1e-12)]:
        graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), name))
    nodes, count = [], 0
    for node in graph.node:
        if node.op_type == "MatMul" and is_int8_weight(node.input[1]):
            x, p = node.input[0], f"round{count}_"
            count += 1
            if way == "bf16":
                nodes += [helper.make_node("Cast", [x], [p + "b"], to=TensorProto.BFLOAT16),
                          helper.make_node("Cast", [p + "b"], [p + "x"], to=TensorProto.FLOAT)]
            elif way in ("int8-row", "int8-tensor"):
                reduce = (helper.make_node("ReduceMax", [p + "abs"], [p + "max"], axes=[-1], keepdims=1)
                          if way == "int8-row" else
                          helper.make_node("ReduceMax", [p + "abs"], [p + "max"], keepdims=1))
                nodes += [helper.make_node("Abs", [x], [p + "abs"]), reduce,
                          helper.make_node("Div", [p + "max", "round_127"], [p + "s0"]),
                          helper.make_node("Max", [p + "s0", "round_tiny"], [p + "s"]),
                          helper.make_node("Div", [x, p + "s"], [p + "d"]),
                          helper.make_node("Round", [p + "d"], [p + "r"]),
                          helper.make_node("Mul", [p + "r", p + "s"], [p + "x"])]
            else:
                nodes += [helper.make_node("ReduceMax", [x], [p + "hi"], axes=[-1], keepdims=1),
                          helper.make_node("ReduceMin", [x], [p + "lo"], axes=[-1], keepdims=1),
                          helper.make_node("Sub", [p + "hi", p + "lo"], [p + "range"]),
                          helper.make_node("Div", [p + "range", "round_255"], [p + "s0"]),
                          helper.make_node("Max", [p + "s0", "round_tiny"], [p + "s"]),
                          helper.make_node("Sub", [x, p + "lo"], [p + "shifted"]),
                          helper.make_node("Div", [p + "shifted", p + "s"], [p + "d"]),
                          helper.make_node("Round", [p + "d"], [p + "r"]),
                          helper.make_node("Mul", [p + "r", p + "s"], [p + "y"]),
                          helper.make_node("Add", [p + "y", p + "lo"], [p + "x"])]
            node.input[0] = p + "x"
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, target)
    return count


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--motions", required=True)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--ways", default="bf16,int8-row,int8-row-asym,int8-tensor")
    arguments = parser.parse_args()
    tokenizer = reference.load_tokenizer(arguments.tokenizer, 256)
    texts = []
    with open(arguments.motions) as lines:
        for line in lines:
            motion = json.loads(line)
            texts.append(f"{motion.get('title') or ''}\n{motion.get('text') or ''}")
            if len(texts) >= arguments.items:
                break
    encodings = [tokenizer.encode(text) for text in texts]
    exact = reference.session(arguments.model, 1)
    names = [model_input.name for model_input in exact.get_inputs()]
    wanted = [reference.embed_batch(exact, names, [encoding])[0] for encoding in encodings]
    with tempfile.TemporaryDirectory() as folder:
        for way in arguments.ways.split(","):
            path = os.path.join(folder, f"{way}.onnx")
            count = rounded_model(arguments.model, path, way)
            session = reference.session(path, 1)
            cosines = np.array([
                float(reference.embed_batch(session, names, [encoding])[0] @ want)
                for encoding, want in zip(encodings, wanted)
            ])
            print(json.dumps({"way": way, "products": count, "texts": len(texts),
                              "lowest": round(float(cosines.min()), 6),
                              "mean": round(float(cosines.mean()), 6),
                              "p1": round(float(np.percentile(cosines, 1)), 6)}))


if __name__ == "__main__":
    main()
