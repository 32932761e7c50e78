"""The shared op layer: every op a model forward needs, one module per family.

Each family module keeps the numpy reference of its ops next to their CUDA
kernels. A backend exposes the ops as methods of one ``ops`` object with the
same names and arguments (typed in orcd.ops.contract), so a model forward is
written once:

    embed(table, ids)                      -> x [T, D]
    rms_norm(x, w, eps) / layer_norm(x, w, b, eps)
    linear(x, w, b=None)                   -> x @ w.T + b   (w: [n_out, n_in], any format)
    split(x, sizes)                        -> views/copies along the last axis
    rope(x, pos, cfg)                      -> x [T, n_head * head_dim] rotated in place/out
    attention(q, k, v, cache, layer, pos, scale, window=0, sinks=None, rope=None)
                                           -> stores k, v at pos and attends; ``rope`` (a
                                              RopeConfig) rotates q and k first
    add(a, b), silu(x), gelu(x), swiglu(gate, up), swiglu_oai(gate, up, alpha, limit)
    moe(x, experts, n_used, alpha, limit)  -> mixture of experts output [T, D] (clamped SwiGLU)
    last_row(x)                            -> x[-1:]

Fused ops (orcd.ops.fused; one launch per decode token on the GPU, references
are compositions of the ops above). ``norm=(w, eps)`` RMS-normalises x first:

    linear_multi(x, (w1, w2, ...), (b1, b2, ...) | None, norm=None) -> (y1, y2, ...)
    gated_linear(x, w_gate, w_up=None, norm=None)   -> swiglu(x @ w_gate.T, x @ w_up.T);
                                       w_up None: w_gate's rows [0, n_ff) gate, [n_ff, 2 n_ff) up
    linear_add(a, w, residual, b=None)               -> residual + a @ w.T (+ b)
    moe_add(x, experts, n_used, alpha, limit, norm=None) -> x + moe(rms_norm(x)) (three kernels)
"""
