"""The large graphs of the planner's scale rows (``partition_quality.py --scale``), traced on the
meta device and cached as IR JSON.

- ``decoder<L>``: the 48-layer Llama of the benchmark (``models.llama("deep")``: hidden 768,
  12 heads, MLP 2048, vocabulary 32,000) with ``L`` layers; one microbatch 8 x 512 tokens.
- ``resnet<B>``: a ResNet of ``B`` v1.5 bottleneck blocks (``models.cnn.Bottleneck``) spread
  over the four stages of ResNet-50 in its 3:4:6:3 proportion; one microbatch 8 x 3 x 224 x 224.

Tracing a graph of 10,000 nodes takes minutes on two cores, so each graph is written once to
``benchmarks/.cache/<name>.ir.json.gz`` (not committed), keyed by the torch and transformers
versions; delete the folder to trace again.
"""

from __future__ import annotations

import gzip
import re
import time
from pathlib import Path
from typing import Any

CACHE = Path(__file__).resolve().parent / ".cache"


def _decoder(layers: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
                      num_key_value_heads=12, intermediate_size=2048, vocab_size=32000,
                      max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0, use_cache=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return model, (torch.zeros(8, 512, dtype=torch.long, device="meta"),)


def _resnet(blocks: int) -> Any:
    import torch
    from torch import nn

    from modelparallel.models.cnn import Bottleneck, ResNet

    share = (3, 4, 6, 3)
    counts = [max(1, round(blocks * s / 16)) for s in share]
    counts[2] += blocks - sum(counts)
    with torch.device("meta"):
        stem = nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
                             nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1))
        stages: list[nn.Module] = []
        in_ch = 64
        for width, k, stride in zip((64, 128, 256, 512), counts, (1, 2, 2, 2)):
            layer = []
            for i in range(k):
                layer.append(Bottleneck(in_ch, width, stride if i == 0 else 1, "batch"))
                in_ch = width * Bottleneck.expansion
            stages.append(nn.Sequential(*layer))
        model = ResNet(stages, stem, in_ch, 1000)
    return model, (torch.zeros(8, 3, 224, 224, device="meta"),)


def load(name: str) -> tuple[Any, float, bool]:
    """The IR graph of ``name`` (``decoder96``, ``resnet200``...), the seconds it took (trace or
    cache read), and whether it came from the cache."""
    import torch
    import transformers

    from modelparallel.ir import Graph

    m = re.fullmatch(r"(decoder|resnet)(\d+)", name)
    if m is None:
        raise ValueError(f"unknown scale graph {name!r}: use decoder<layers> or resnet<blocks>")
    key = f"{name}-torch{torch.__version__}-tf{transformers.__version__}".replace("+", "_")
    path = CACHE / f"{key}.ir.json.gz"
    t0 = time.perf_counter()
    if path.exists():
        return Graph.from_json(gzip.decompress(path.read_bytes()).decode()), \
            time.perf_counter() - t0, True
    from modelparallel.tracer import trace

    model, args = (_decoder if m.group(1) == "decoder" else _resnet)(int(m.group(2)))
    graph = trace(model, args).graph
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(graph.to_json().encode()))
    return graph, time.perf_counter() - t0, False
