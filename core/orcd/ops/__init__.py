"""The shared op layer: every op a model forward needs, one module per family.

Each family module keeps the numpy reference of its ops next to their CUDA
kernels. A backend exposes the ops as methods of one ``ops`` object with the
same names and arguments, so a model forward is written once:

    embed(table, ids)                      -> x [T, D]
    rms_norm(x, w, eps) / layer_norm(x, w, b, eps)
    linear(x, w, b=None)                   -> x @ w.T + b   (w: [n_out, n_in], any format)
    split(x, sizes)                        -> views/copies along the last axis
    rope(x, pos, cfg)                      -> x [T, n_head * head_dim] rotated in place/out
    attention(q, k, v, cache, layer, pos, n_head, n_head_kv, scale, window, sinks)
    add(a, b), mul(a, b), silu(x), gelu(x), swiglu(gate, up), swiglu_oai(gate, up, alpha, limit)
    moe(x, experts, n_used)                -> mixture of experts output [T, D]
    last_row(x)                            -> x[-1:]
"""
