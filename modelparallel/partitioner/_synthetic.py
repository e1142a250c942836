"""Synthetic IR graphs for tests and experiments (no torch needed).

They follow the shapes and module paths the tracer produces for real models closely enough to
exercise the partitioner: a plain chain, a GPT-2-like decoder at op level (tied embeddings,
masks derived from the inputs), a UNet-like CNN with long skips, and random DAGs.

Example:
    >>> g = transformer_graph(layers=2)
    >>> g.output.inputs
    ('lm_head',)
"""

from __future__ import annotations

import random

from modelparallel.ir import Graph, Node, OpKind, Param, TensorMeta

__all__ = ["chain_graph", "random_graph", "transformer_graph", "unet_graph"]


def _t(*shape: int, grad: bool = True, dtype: str = "float32") -> tuple[TensorMeta, ...]:
    return (TensorMeta(tuple(shape), dtype, grad),)


def chain_graph(n: int, *, width: int = 256, batch: int = 32, seed: int | None = None) -> Graph:
    """``x -> fc0 -> fc1 -> ... -> output``: ``n`` linear layers, optionally of random widths.

    Example:
        >>> len(chain_graph(3))
        5
    """
    rng = random.Random(seed)
    nodes = [Node("x", OpKind.PLACEHOLDER, "x", outputs=_t(batch, width, grad=False))]
    params = []
    prev, w_in = "x", width
    for i in range(n):
        w_out = width if seed is None else rng.choice([width // 2, width, 2 * width])
        name = f"fc{i}"
        params.append(Param(f"layers.{i}.weight", (w_out, w_in), "float32"))
        nodes.append(Node(name, OpKind.CALL_FUNCTION, "aten.mm.default", inputs=(prev,),
                          outputs=_t(batch, w_out), params=(f"layers.{i}.weight",),
                          module_path=f"layers.{i}", module_type="Linear",
                          flops=2 * batch * w_in * w_out))
        prev, w_in = name, w_out
    nodes.append(Node("output", OpKind.OUTPUT, "output", inputs=(prev,)))
    return Graph("chain", tuple(nodes), tuple(params), {"tracer": "synthetic"})


def transformer_graph(layers: int = 4, *, hidden: int = 256, seq: int = 128, batch: int = 4,
                      vocab: int = 1000, heads: int = 4, tied: bool = True) -> Graph:
    """A GPT-2-like decoder at op level: embeddings, ``layers`` blocks, final norm, LM head.

    Example:
        >>> g = transformer_graph(layers=1)
        >>> sorted(g.tied_params())
        ['transformer.wte.weight']
    """
    b, s, h = batch, seq, hidden
    nodes: list[Node] = []
    params: list[Param] = []

    def add(name: str, target: str, inputs: tuple[str, ...], out: tuple[TensorMeta, ...],
            module: str, mtype: str, flops: int = 0, ps: tuple[str, ...] = (),
            kind: str = "tensor") -> str:
        nodes.append(Node(name, OpKind.CALL_FUNCTION, target, inputs=inputs, outputs=out,
                          params=ps, module_path=module, module_type=mtype, flops=flops,
                          value_kind=kind))
        return name

    def param(name: str, *shape: int) -> str:
        params.append(Param(name, shape, "float32"))
        return name

    nodes.append(Node("input_ids", OpKind.PLACEHOLDER, "input_ids",
                      outputs=_t(b, s, grad=False, dtype="int64")))
    add("size", "aten.sym_size.int", ("input_ids",), (), "", "", kind="scalar")
    add("arange", "aten.arange.default", ("size",), _t(s, grad=False, dtype="int64"), "", "")
    add("mask", "aten.triu.default", ("arange",), _t(s, s, grad=False, dtype="bool"), "", "")
    wte = param("transformer.wte.weight", vocab, h)
    add("wte", "aten.embedding.default", ("input_ids",), _t(b, s, h), "transformer.wte",
        "Embedding", ps=(wte,))
    wpe = param("transformer.wpe.weight", s, h)
    add("wpe", "aten.embedding.default", ("arange",), _t(1, s, h), "transformer.wpe",
        "Embedding", ps=(wpe,))
    x = add("emb_add", "aten.add.Tensor", ("wte", "wpe"), _t(b, s, h), "transformer", "GPT2")
    for i in range(layers):
        m = f"transformer.h.{i}"

        def ln(name: str, inp: str, mod: str, m: str = m) -> str:
            g_ = param(f"{m}.{mod}.weight", h)
            b_ = param(f"{m}.{mod}.bias", h)
            return add(name, "aten.layer_norm.default", (inp,), _t(b, s, h), f"{m}.{mod}",
                       "LayerNorm", flops=5 * b * s * h, ps=(g_, b_))

        a = ln(f"h{i}_ln1", x, "ln_1")
        w = param(f"{m}.attn.c_attn.weight", h, 3 * h)
        qkv = add(f"h{i}_qkv", "aten.addmm.default", (a,), _t(b, s, 3 * h), f"{m}.attn.c_attn",
                  "Conv1D", flops=2 * b * s * h * 3 * h, ps=(w,))
        q = add(f"h{i}_q", "aten.view.default", (qkv,), _t(b, heads, s, h // heads),
                f"{m}.attn", "GPT2Attention")
        k = add(f"h{i}_k", "aten.view.default", (qkv,), _t(b, heads, s, h // heads),
                f"{m}.attn", "GPT2Attention")
        v = add(f"h{i}_v", "aten.view.default", (qkv,), _t(b, heads, s, h // heads),
                f"{m}.attn", "GPT2Attention")
        sc = add(f"h{i}_scores", "aten.matmul.default", (q, k), _t(b, heads, s, s), f"{m}.attn",
                 "GPT2Attention", flops=2 * b * s * s * h)
        sm = add(f"h{i}_masked", "aten.masked_fill.Scalar", (sc, "mask"), _t(b, heads, s, s),
                 f"{m}.attn", "GPT2Attention", flops=b * heads * s * s)
        pr = add(f"h{i}_softmax", "aten.softmax.int", (sm,), _t(b, heads, s, s), f"{m}.attn",
                 "GPT2Attention", flops=5 * b * heads * s * s)
        ctx = add(f"h{i}_ctx", "aten.matmul.default", (pr, v), _t(b, heads, s, h // heads),
                  f"{m}.attn", "GPT2Attention", flops=2 * b * s * s * h)
        merged = add(f"h{i}_merge", "aten.view.default", (ctx,), _t(b, s, h), f"{m}.attn",
                     "GPT2Attention")
        w = param(f"{m}.attn.c_proj.weight", h, h)
        proj = add(f"h{i}_proj", "aten.addmm.default", (merged,), _t(b, s, h),
                   f"{m}.attn.c_proj", "Conv1D", flops=2 * b * s * h * h, ps=(w,))
        r1 = add(f"h{i}_res1", "aten.add.Tensor", (x, proj), _t(b, s, h), m, "GPT2Block")
        a2 = ln(f"h{i}_ln2", r1, "ln_2")
        w = param(f"{m}.mlp.c_fc.weight", h, 4 * h)
        fc = add(f"h{i}_fc", "aten.addmm.default", (a2,), _t(b, s, 4 * h), f"{m}.mlp.c_fc",
                 "Conv1D", flops=2 * b * s * h * 4 * h, ps=(w,))
        act = add(f"h{i}_gelu", "aten.gelu.default", (fc,), _t(b, s, 4 * h), f"{m}.mlp.act",
                  "NewGELUActivation", flops=8 * b * s * 4 * h)
        w = param(f"{m}.mlp.c_proj.weight", 4 * h, h)
        fc2 = add(f"h{i}_fc2", "aten.addmm.default", (act,), _t(b, s, h), f"{m}.mlp.c_proj",
                  "Conv1D", flops=2 * b * s * 4 * h * h, ps=(w,))
        x = add(f"h{i}_res2", "aten.add.Tensor", (r1, fc2), _t(b, s, h), m, "GPT2Block")
    g_ = param("transformer.ln_f.weight", h)
    b_ = param("transformer.ln_f.bias", h)
    x = add("ln_f", "aten.layer_norm.default", (x,), _t(b, s, h), "transformer.ln_f", "LayerNorm",
            flops=5 * b * s * h, ps=(g_, b_))
    head_w = wte if tied else param("lm_head.weight", vocab, h)
    add("lm_head", "aten.mm.default", (x,), _t(b, s, vocab), "lm_head", "Linear",
        flops=2 * b * s * h * vocab, ps=(head_w,))
    nodes.append(Node("output", OpKind.OUTPUT, "output", inputs=("lm_head",)))
    return Graph("transformer", tuple(nodes), tuple(params), {"tracer": "synthetic"})


def unet_graph(levels: int = 3, *, channels: int = 32, size: int = 64, batch: int = 4) -> Graph:
    """A UNet-like CNN: ``levels`` encoder stages whose outputs are concatenated into the
    matching decoder stages (long skips).

    Example:
        >>> g = unet_graph(2)
        >>> any(n.target == "aten.cat.default" for n in g)
        True
    """
    nodes: list[Node] = [Node("image", OpKind.PLACEHOLDER, "image",
                              outputs=_t(batch, 3, size, size, grad=False))]
    params: list[Param] = []

    def conv(name: str, inp: str, cin: int, cout: int, hw: int, module: str) -> str:
        w = f"{module}.weight"
        params.append(Param(w, (cout, cin, 3, 3), "float32"))
        nodes.append(Node(name, OpKind.CALL_FUNCTION, "aten.convolution.default", inputs=(inp,),
                          outputs=_t(batch, cout, hw, hw), params=(w,), module_path=module,
                          module_type="Conv2d", flops=2 * batch * cout * cin * 9 * hw * hw))
        relu = f"{name}_relu"
        nodes.append(Node(relu, OpKind.CALL_FUNCTION, "aten.relu.default", inputs=(name,),
                          outputs=_t(batch, cout, hw, hw), module_path=module + "_act",
                          module_type="ReLU", flops=batch * cout * hw * hw))
        return relu

    x, c, hw = "image", 3, size
    skips: list[tuple[str, int, int]] = []
    for lv in range(levels):
        cout = channels * 2**lv
        x = conv(f"enc{lv}_a", x, c, cout, hw, f"down.{lv}.conv1")
        x = conv(f"enc{lv}_b", x, cout, cout, hw, f"down.{lv}.conv2")
        skips.append((x, cout, hw))
        nodes.append(Node(f"pool{lv}", OpKind.CALL_FUNCTION, "aten.max_pool2d.default",
                          inputs=(x,), outputs=_t(batch, cout, hw // 2, hw // 2),
                          module_path=f"down.{lv}.pool", module_type="MaxPool2d",
                          flops=batch * cout * hw * hw))
        x, c, hw = f"pool{lv}", cout, hw // 2
    x = conv("mid", x, c, c, hw, "mid.conv")
    for lv in reversed(range(levels)):
        skip, cs, hws = skips[lv]
        nodes.append(Node(f"up{lv}", OpKind.CALL_FUNCTION, "aten.upsample_nearest2d.default",
                          inputs=(x,), outputs=_t(batch, c, hws, hws),
                          module_path=f"up.{lv}.upsample", module_type="Upsample",
                          flops=batch * c * hws * hws))
        nodes.append(Node(f"cat{lv}", OpKind.CALL_FUNCTION, "aten.cat.default",
                          inputs=(f"up{lv}", skip), outputs=_t(batch, c + cs, hws, hws),
                          module_path=f"up.{lv}", module_type="UpBlock"))
        x = conv(f"dec{lv}", f"cat{lv}", c + cs, cs, hws, f"up.{lv}.conv")
        c, hw = cs, hws
    head = "head"
    params.append(Param("head.weight", (2, c, 1, 1), "float32"))
    nodes.append(Node(head, OpKind.CALL_FUNCTION, "aten.convolution.default", inputs=(x,),
                      outputs=_t(batch, 2, hw, hw), params=("head.weight",), module_path="head",
                      module_type="Conv2d", flops=2 * batch * 2 * c * hw * hw))
    nodes.append(Node("output", OpKind.OUTPUT, "output", inputs=(head,)))
    return Graph("unet", tuple(nodes), tuple(params), {"tracer": "synthetic"})


def random_graph(n: int, *, seed: int = 0, edge_prob: float = 0.3, tie_prob: float = 0.1,
                 derived: bool = True, view_prob: float = 0.0) -> Graph:
    """A random DAG of ``n`` op nodes with random sizes, FLOPs, parameters and some tied reads.

    Every node consumes at least one earlier value, so the graph is connected to its input.
    With probability ``view_prob`` a node is instead a free view of one earlier value (a
    reshape of the same size or a slice of half of it; Note [exact reduction] in
    ``modelparallel/partitioner/reduce.py``).

    Example:
        >>> len(random_graph(5, seed=1)) >= 7
        True
        >>> any(nd.target == "aten.view.default" for nd in random_graph(8, view_prob=0.5))
        True
    """
    rng = random.Random(seed)
    nodes: list[Node] = [Node("x", OpKind.PLACEHOLDER, "x", outputs=_t(8, 64, grad=False))]
    if derived:
        nodes.append(Node("xd", OpKind.CALL_FUNCTION, "aten.mul.Tensor", inputs=("x",),
                          outputs=_t(8, 64, grad=False), flops=512))
    params: list[Param] = []
    names = [nd.name for nd in nodes]
    op_names: list[str] = []
    widths: dict[str, int] = {"x": 64, "xd": 64}
    for i in range(n):
        cands = names if not op_names else op_names + names[:1]
        if view_prob > 0 and op_names and rng.random() < view_prob:
            src = op_names[-1] if rng.random() < 0.7 else rng.choice(op_names[-4:])
            half = rng.random() < 0.5
            target = "aten.slice.Tensor" if half else "aten.view.default"
            width = max(1, widths[src] // 2) if half else widths[src]
            name = f"op{i}"
            shape = (8, width) if half else (width, 8)
            nodes.append(Node(name, OpKind.CALL_FUNCTION, target, inputs=(src,),
                              outputs=_t(*shape), module_path=f"m{i // 3}.sub{i}"))
            widths[name] = width
            op_names.append(name)
            names.append(name)
            continue
        k = 1 + sum(rng.random() < edge_prob for _ in range(2))
        inputs = tuple(dict.fromkeys(rng.choice(cands[-6:]) for _ in range(k)))
        ps: tuple[str, ...] = ()
        if params and rng.random() < tie_prob:
            ps = (rng.choice(params).name,)
        elif rng.random() < 0.7:
            pname = f"m{i}.weight"
            params.append(Param(pname, (rng.randint(1, 64), 64), "float32"))
            ps = (pname,)
        width = rng.choice([16, 64, 256])
        name = f"op{i}"
        nodes.append(Node(name, OpKind.CALL_FUNCTION, "aten.addmm.default", inputs=inputs,
                          outputs=_t(8, width), params=ps, module_path=f"m{i // 3}.sub{i}",
                          flops=rng.randint(0, 4) * 10**rng.randint(5, 9)))
        widths[name] = width
        op_names.append(name)
        names.append(name)
    used = {s for nd in nodes for s in nd.inputs}
    sinks = tuple(nm for nm in op_names if nm not in used) or (op_names[-1],)
    nodes.append(Node("output", OpKind.OUTPUT, "output", inputs=sinks))
    return Graph(f"random{seed}", tuple(nodes), tuple(params), {"tracer": "synthetic"})
