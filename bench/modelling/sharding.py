"""Per-rank memory under data parallelism (RunConfig.shard, world_size ranks), from the single-device moments.

Sources, cited where used:
- [fsdp2] torch 2.13 FSDP2 (torch/distributed/fsdp/_fully_shard): each parameter is split on dim 0 into world_size
  chunks of ceil(rows / world_size) rows, the last padded, so rank 0 holds the largest (the one estimated here);
  frozen parameters are sharded like trained ones and have no gradient; buffers are replicated. A unit (a decoder
  layer, or the root: embeddings, final norm, lm_head) is all-gathered into one flat buffer and copied out into
  its parameters; the root stays gathered from its forward to the end of backward; gradients are reduce-scattered
  from a flat buffer of the unit's unsharded gradients into the rank's chunk, and that input buffer is held until
  the next unit's reduce-scatter. Optimizer state follows the chunks.
- [ledger] bench.measuring.sharded: each moment below (marked [ledger] where it is added) is where a measured
  per-rank peak fell (reports/estimate-validation-sharded): the first and the last layer's forward, the loss in
  forward, the loss backward, the last layer's backward and its reduce-scatter, the end of layer 1's backward,
  Full FT's backward through the embeddings, and the optimizer step on the chunks.
- [ddp] torch DistributedDataParallel: every rank holds everything; the reducer's gradient buckets are a second copy
  of every trained gradient (gradient_as_bucket_view=False, the default). Estimated only: not measured here.
- [bnb] QLoRA under FSDP shards the packed 4-bit data (stored in the parameters' dtype, bnb_4bit_quant_storage, as
  FSDP requires); its quantisation constants live outside the parameters and are replicated on every rank. Not
  measurable on this stack (FSDP2 turns Params4bit into a DTensor without its quant_state): estimated only.
"""

from __future__ import annotations

import math
from dataclasses import replace

from qlora.quantize import KEEP_UNQUANTISED


def chunk(shape: tuple, ranks: int) -> int:
    """[fsdp2] Elements of rank 0's chunk of a tensor of `shape` split on dim 0 (padded: every rank's storage)."""
    if not shape:
        return 1
    return math.ceil(shape[0] / ranks) * math.prod(shape[1:])


def tensors(cfg, arch, element_bytes: int) -> dict:
    """Every parameter of the model as (shape, bytes per element, trained), split into the root's and one layer's.
    `element_bytes`: the trained tensors' (the adapters', or every parameter's under Full FT)."""
    p = 4 if cfg.precision == "fp32" else 2
    full = cfg.method == "full"
    root = [(s, 4 if cfg.kbit_prepare else p, full) for s in arch.root_shapes]
    layer = [(s, 4 if cfg.kbit_prepare else p, full) for s in arch.layer_extra_shapes]
    for leaf, fan_in, fan_out, bias in arch.linears:
        if cfg.quantized and leaf not in KEEP_UNQUANTISED:
            layer.append(((fan_out * fan_in // 2,), 1, False))  # packed 4-bit bytes
        else:
            layer.append(((fan_out, fan_in), p, full))
        if bias:
            layer.append(((fan_out,), p, full))
        if cfg.adapter and leaf in cfg.lora_targets:
            layer += [((cfg.lora_r, fan_in), element_bytes, True), ((fan_out, cfg.lora_r), element_bytes, True)]
    if full:  # trained tensors' gradients and state are in the trained dtype
        root = [(s, element_bytes, True) for s, _, _ in root]
        layer = [(s, element_bytes if t else b, t) for s, b, t in layer]
    return {"root": root, "layer": layer}


def per_rank(cfg, arch, st, act: dict, moments: dict, optimizer_state, optimizer_temporaries, device_type: str
             ) -> tuple[dict, dict]:
    """The single-device `moments` (category dicts) as rank 0 of cfg.world_size sees them, and what the sharding
    adds (`sharding`: gathered units, per-rank static bytes). `st` is the single-device Static; `optimizer_state`
    and `optimizer_temporaries` are the estimator's own functions, applied to the rank's chunks."""
    n = cfg.world_size
    if cfg.shard == "ddp":  # [ddp] replicated, plus a bucket copy of the trained gradients in every moment
        buckets = st.trainable_bytes
        return ({k: {**m, "other": m["other"] + buckets} for k, m in moments.items()},
                {"gradient_buckets": buckets})
    t = tensors(cfg, arch, st.element_bytes)
    lora = [(s, b) for s, b, tr in t["layer"] if tr and cfg.adapter]
    base_layer = [(s, b) for s, b, tr in t["layer"] if not (tr and cfg.adapter)]
    weights = (sum(chunk(s, n) * b for s, b, _ in t["root"])
               + arch.layers * sum(chunk(s, n) * b for s, b in base_layer) + arch.buffer_bytes)
    adapter = arch.layers * sum(chunk(s, n) * b for s, b in lora)
    trained_root = [chunk(s, n) for s, _, tr in t["root"] if tr]
    trained_layer = [chunk(s, n) for s, _, tr in t["layer"] if tr]
    sharded = replace(st, weights=weights, adapter=adapter, trainable=tuple(trained_root + trained_layer * arch.layers))
    opt = optimizer_state(cfg, sharded, device_type)
    root_bytes = sum(math.prod(s) * b for s, b, _ in t["root"])
    layer_bytes = sum(math.prod(s) * b for s, b, _ in t["layer"])
    layer_grads = sum(math.prod(s) for s, _, tr in t["layer"] if tr) * st.element_bytes
    layer_grad_chunks = sum(trained_layer) * st.element_bytes
    base = {"weights": weights + root_bytes, "quant_state": st.quant_state, "adapter": adapter, "optimizer": opt}
    every_layer = cfg.shard == "fsdp-grad-op"  # gathered from forward to backward
    gathered_layers = arch.layers * layer_bytes if every_layer else 0
    in_flight = 0 if every_layer else layer_bytes  # the next layer's all-gather, prefetched in backward
    below = in_flight if arch.layers > 1 else 0  # inside the last layer's backward: the one below it, if any
    full = cfg.method == "full"
    e, a, tokens = st.element_bytes, act["a"], act["tokens"]  # trained bytes per element; activation dtype's
    out = {}
    ratio = sharded.trainable_bytes / st.trainable_bytes if st.trainable_bytes else 0
    for name, m in moments.items():
        if name == "optimizer":  # the root is resharded after backward: only the chunks
            out[name] = {**base, "weights": weights, "gradients": sharded.trainable_bytes,
                         "activations": m["activations"],
                         "other": optimizer_temporaries(cfg, sharded, device_type)}
            continue
        inside = name != "backward"  # inside a layer's backward: that layer is gathered too (unless all are)
        out[name] = {**base, "weights": base["weights"] + gathered_layers + (layer_bytes if inside and not every_layer
                                                                            else 0),
                     "gradients": int(m["gradients"] * ratio), "activations": m["activations"],
                     "other": m["other"] + in_flight + (layer_grads if inside and full else 0)}
    # [ledger] the first layer's forward: the root and layer 0 are gathered, and both flat all-gather buffers are
    # still held (FSDP frees one when the next gather is waited on); only the embedding output (not yet saved),
    # the rotary tables and, under Full FT, the embedding's indices exist of the batch
    out["first_layer_forward"] = {**base, "weights": base["weights"] + layer_bytes, "gradients": 0,
                                  "activations": 2 * a * tokens * arch.head_dim + (8 * tokens if full else 0),
                                  "other": root_bytes + layer_bytes + a * tokens * arch.hidden}
    if arch.layers >= 2:
        # [ledger] the last layer's forward begins: it is gathered, its flat all-gather buffer and the previous
        # layer's are both held, every layer below has saved its activations, the hidden state and its copy
        # (the residual) are live
        out["last_layer_forward"] = {
            **base, "weights": base["weights"] + (gathered_layers or layer_bytes), "gradients": 0,
            "activations": act["total"] - act["loss"] - act["head"]
            - (a * tokens * arch.hidden if cfg.grad_checkpointing else act["layer"]["total"]),  # its input only
            "other": 2 * layer_bytes + 2 * a * tokens * arch.hidden}
    # [ledger] the loss in forward: every activation is saved, the bf16 logits and their fp32 copy are live (the
    # log-softmax is saved), and the last layer's flat all-gather buffer is held until the root's forward ends
    out["loss_forward"] = {**base, "weights": base["weights"] + gathered_layers, "gradients": 0,
                           "activations": act["total"],
                           "other": layer_bytes + (2 + 4) * tokens * arch.vocab}
    if not cfg.grad_checkpointing:
        # [ledger] backward into the last layer's MLP: the loss and head are done (under Full FT lm_head's and the
        # final norm's unsharded gradients wait for the root's reduce-scatter, and down_proj's weight gradient is
        # the MLP's first), the layer is gathered and the next one's all-gather is in flight
        down = next((i * o for leaf, i, o, _ in arch.linears if leaf == "down_proj"), 0)
        head_grads = (arch.vocab * arch.hidden + arch.hidden + down) * e if full else 0
        out["last_layer"] = {**base, "weights": base["weights"] + (0 if every_layer else layer_bytes) + gathered_layers,
                             "gradients": 0, "activations": act["total"] - act["loss"] - act["head"],
                             "other": below + head_grads + a * tokens * (arch.hidden + arch.inter)}
    if full and not cfg.grad_checkpointing:
        # [ledger] the last layer's gradients reduce-scattered: its unsharded gradients and their copy in the
        # reduce-scatter's input buffer, its chunk, the next layer's all-gather in flight, lm_head's and the final
        # norm's unsharded gradients, the gradient flowing into the layer below; that layer's activations are saved
        saved = act["total"] - act["loss"] - act["head"] - act["layer"]["total"]
        out["last_layer_reduce"] = {**base, "gradients": layer_grad_chunks, "activations": saved,
                                    "other": 2 * layer_grads + below + (arch.vocab + 1) * arch.hidden * e
                                    + a * tokens * arch.hidden}
    if full and not cfg.grad_checkpointing and arch.layers >= 2:
        # [ledger] the end of layer 1's backward (its first norm's), the worst of the layers below the last: layer
        # 1 gathered and its Linears' unsharded gradients computed, layer 0's all-gather in flight and its
        # activations saved, layer 2's reduce-scatter input still held (if layer 2 is not the last), every layer
        # above reduced to its chunk, lm_head's and the norms' unsharded gradients, and the RMSNorm backward's
        # fp32 temporaries; lower layers hold fewer activations and more chunks, layer 0 nothing in flight
        linear_grads = sum(i * o + (o if bias else 0) for _, i, o, bias in arch.linears) * e
        out["layer_backward"] = {
            **base, "weights": base["weights"] + layer_bytes, "gradients": (arch.layers - 2) * layer_grad_chunks,
            "activations": act["total"] - act["loss"] - act["head"] - (arch.layers - 1) * act["layer"]["total"]
            + 4 * tokens * arch.hidden,
            "other": (layer_grads if arch.layers > 2 else 0) + in_flight + arch.vocab * arch.hidden * e
            + 3 * arch.hidden * e + linear_grads + (5 * 4 + a) * tokens * arch.hidden}
    if full:
        # [ledger] backward through the embeddings: the root's gradients (tied: lm_head's and the embedding's and
        # their sum; untied: lm_head's and the embedding's, and the final norm's) unsharded, beside every layer's
        # reduce-scattered chunk and the last reduce-scatter's input buffer
        vh = arch.vocab * arch.hidden * e
        root_grads = (3 * vh if arch.tied else 2 * vh) + arch.hidden * e
        out["embedding"] = {**base, "gradients": arch.layers * layer_grad_chunks,
                            "activations": 8 * tokens, "other": root_grads + layer_grads}
    return out, {"gathered_root_bytes": root_bytes, "gathered_layer_bytes": layer_bytes,
                 "static_per_rank": {"weights": weights, "adapter": adapter, "gradients": sharded.trainable_bytes,
                                     "optimizer": opt, "quant_state": st.quant_state}}
