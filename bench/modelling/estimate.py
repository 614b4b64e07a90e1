"""Analytical memory model: every category at the peak of a training step, for any bundled-style architecture,
without running it. The architecture is built on the meta device (shapes only), so a 70B estimate takes seconds.

Sources, cited where used:
- [bnb] bitsandbytes 0.50 layouts: 4-bit weights packed two per byte; one absmax per block of 64, stored fp32, or
  with double quantisation as uint8 codes plus one fp32 absmax per 256 codes, a 256-entry fp32 code table and an fp32
  offset; a 16-entry fp32 4-bit code table per weight. 8-bit optimizers: uint8 state with one fp32 absmax per block
  of 256 for tensors of at least 4096 elements, fp32 state below that, and two shared 256-entry fp32 quantile maps.
- [torch] PyTorch autograd saves only what a backward formula needs for inputs that require grad
  (tools/autograd/derivatives.yaml): pow saves its input, rsqrt its result, mul the other operand, linear its input
  when the weight is trained, SDPA (flash/efficient kernels) q, k, v, the output and a fp32 logsumexp per head.
- [hf] transformers 5 Llama-family blocks (Llama, Mistral, Qwen2): RMSNorm upcasts to fp32; the loss upcasts logits
  to fp32 and saves log-softmax; rotary cos/sin are computed once per forward.
- [peft] LoRA: dropout saves its mask (in the input's dtype on CPU, a bool mask on CUDA, where torch fuses
  dropout into native_dropout) and lora_A its (dropped-out) input, lora_B the rank-r intermediate.
- [ledger] this project's measurement (bench/ledger.py) of what is live at the peak; used to check every term
  (reports/estimate-validation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from bench.modelling.optimizer_bytes import adamw_impl, optimizer_state, optimizer_temporaries  # noqa: F401
from bench.schema import CATEGORIES
from qlora import models
from qlora.build import model_dtype
from qlora.config import RunConfig
from qlora.quantize import KEEP_UNQUANTISED
from qlora.savers import LOSS_CHUNK_TOKENS


@dataclass(frozen=True)
class Arch:
    """What the memory model needs of an architecture, read off its meta-device build."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int
    tied: bool
    linears: tuple  # (leaf name, in, out, has_bias) of one decoder layer's Linears
    other_params: int  # elements outside the decoder Linears (embeddings, norms, lm_head once if untied)
    buffer_bytes: int  # rotary inv_freq and friends, fp32
    param_numels: tuple  # every parameter tensor's element count (tied ones once): Full FT's trainable tensors
    max_positions: int | None = None
    # shapes, for sharding (FSDP splits each parameter on its first dimension): the parameters of one decoder layer
    # that are not in its Linears (norms), and those outside the decoder layers (embeddings, final norm, lm_head)
    layer_extra_shapes: tuple = ()
    root_shapes: tuple = ()

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def read_arch(cfg: RunConfig) -> Arch:
    from torch import nn

    hf = models.hf_config(models.resolve(cfg.model), cfg.layers)
    meta = models.meta_model(hf, model_dtype(cfg))
    layers = meta.get_decoder().layers
    linears = tuple((n.rsplit(".", 1)[-1], m.in_features, m.out_features, m.bias is not None)
                    for n, m in layers[0].named_modules() if isinstance(m, nn.Linear))
    in_linears = {id(p) for m in layers.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
    params = list(meta.parameters())  # tied embeddings appear once
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return Arch(
        layers=hf.num_hidden_layers, hidden=hf.hidden_size, heads=hf.num_attention_heads,
        kv_heads=hf.num_key_value_heads, head_dim=head_dim, inter=hf.intermediate_size, vocab=hf.vocab_size,
        tied=bool(getattr(hf, "tie_word_embeddings", False)), linears=linears,
        other_params=sum(p.numel() for p in params if id(p) not in in_linears),
        buffer_bytes=sum(b.numel() * b.element_size() for b in meta.buffers()),
        param_numels=tuple(p.numel() for p in params),
        max_positions=getattr(hf, "max_position_embeddings", None),
        layer_extra_shapes=tuple(tuple(p.shape) for p in layers[0].parameters() if id(p) not in in_linears),
        root_shapes=tuple(tuple(p.shape) for p in params if id(p) not in {id(q) for q in layers.parameters()}),
    )


_ARCHS: dict[tuple, Arch] = {}


def arch_of(cfg: RunConfig) -> Arch:
    """read_arch, once per model, precision, targets and depth in this process (it builds the model on the meta
    device, which takes a second at 7B): reports and plans estimate the same architecture many times."""
    key = (cfg.model, cfg.precision, cfg.lora_targets, cfg.layers)
    if key not in _ARCHS:
        _ARCHS[key] = read_arch(cfg)
    return _ARCHS[key]


def quant_state_bytes(numel: int, double_quant: bool) -> int:
    """[bnb] Quantisation constants of one 4-bit weight of `numel` elements."""
    blocks = math.ceil(numel / 64)
    code4 = 16 * 4
    if not double_quant:
        return blocks * 4 + code4
    return blocks + math.ceil(blocks / 256) * 4 + 256 * 4 + 4 + code4


@dataclass(frozen=True)
class Static:
    """What a configuration holds before any step: bytes of weights, quantisation constants and adapters, and the
    trainable tensors whose gradients and optimizer state the step adds."""

    weights: int
    quant_state: int
    adapter: int
    trainable: tuple[int, ...]  # element count of each trainable tensor
    element_bytes: int  # bytes per trainable element (its gradient too): 4 in fp32 or for fp32 adapters, else 2

    @property
    def trainable_bytes(self) -> int:
        return sum(self.trainable) * self.element_bytes

    def moment_bytes(self, cfg: RunConfig) -> int:
        """Bytes per element of an AdamW moment: fp32 under mixed precision (the masters'), else the trainable
        tensors' own dtype (torch keeps moments in the parameter's dtype)."""
        return 4 if cfg.precision == "mixed" else self.element_bytes


def static(cfg: RunConfig, arch: Arch) -> Static:
    """Weights, quantisation constants, adapters, the trainable tensors (for gradients and optimizer state)."""
    p = 4 if cfg.precision == "fp32" else 2  # bytes per stored weight
    # [peft] prepare_model_for_kbit_training casts every parameter that is not 4-bit to fp32
    weights = arch.other_params * (4 if cfg.kbit_prepare else p) + arch.buffer_bytes
    quant = 0
    trainable: list[int] = []
    for leaf, fan_in, fan_out, bias in arch.linears:
        n = fan_in * fan_out
        if cfg.quantized and leaf not in KEEP_UNQUANTISED:
            weights += arch.layers * (n // 2 + (fan_out * p if bias else 0))
            quant += arch.layers * quant_state_bytes(n, cfg.double_quant)
        else:
            weights += arch.layers * (n + (fan_out if bias else 0)) * p
        if cfg.adapter and leaf in cfg.lora_targets:
            trainable += [cfg.lora_r * fan_in, fan_out * cfg.lora_r] * arch.layers
    element = adapter_bytes(cfg) if cfg.adapter else p
    adapter = sum(trainable) * element
    if cfg.method == "full":
        trainable = list(arch.param_numels)
    return Static(weights=weights, quant_state=quant, adapter=adapter, trainable=tuple(trainable),
                  element_bytes=element)


def activation_bytes(cfg: RunConfig) -> int:
    """[hf][peft] Bytes per element of the base path's activations: fp32 under precision fp32, or when
    prepare_model_for_kbit_training's fp32 embeddings and norms carry the residual stream in fp32 (the 4-bit
    Linears return their input's dtype); else bf16."""
    return 4 if cfg.precision == "fp32" or cfg.kbit_prepare else 2


def adapter_bytes(cfg: RunConfig) -> int:
    """[peft] Bytes per element of the adapters and of what their path saves (peft casts each adapter's input to
    the adapter's dtype): fp32 adapters or precision fp32, else bf16."""
    return 4 if cfg.precision == "fp32" or cfg.adapter_dtype == "fp32" else 2


# The activation each projection of a Llama-family block reads (and, when its weight is trained or it has an
# adapter, saves for backward): q, k and v share the first norm's output, o_proj reads attention's output, gate and
# up share the second norm's output, down_proj reads silu(gate) * up. Two projections reading one input save it once.
LINEAR_INPUT = {
    "q_proj": "attention_norm", "k_proj": "attention_norm", "v_proj": "attention_norm", "o_proj": "attention_output",
    "gate_proj": "mlp_norm", "up_proj": "mlp_norm", "down_proj": "gated_product",
}
ATTENTION_LINEARS = frozenset(("q_proj", "k_proj", "v_proj", "o_proj"))  # the rest are the MLP's


def layer_activations(cfg: RunConfig, arch: Arch, tokens: int, first: bool) -> dict:
    """[torch][hf][peft] Bytes one decoder layer saves for backward (no checkpointing), split into its attention
    half (first norm, attention, q/k/v/o adapters) and its MLP half; "total" is both. `first`: layer 0, whose input
    does not require grad under LoRA, so its first norm saves nothing and its first dropouts no mask."""
    a, ad = activation_bytes(cfg), adapter_bytes(cfg)  # bytes per element: base path, adapter path
    T, h, i = tokens, arch.hidden, arch.inter
    full = cfg.method == "full"
    norm = 4 * T * h + 4 * T + (a * T * h if full else 0)  # fp32 upcast, rsqrt, and the bf16 input of weight*x
    if cfg.attention == "sdpa":
        attn = a * T * (2 * arch.q_dim + 2 * arch.kv_dim) + 4 * T * arch.heads  # q, k, v, out, logsumexp
        attn_out_saved = True  # o_proj's input is SDPA's saved output (same storage)
    else:
        # [hf] eager: q, k and v (repeat_kv materialises them at every query head under GQA), the fp32 softmax
        # output and its copy in the activation dtype, both b x heads x s x s.
        kv = arch.q_dim if arch.kv_heads != arch.heads else arch.kv_dim
        attn = a * T * (arch.q_dim + 2 * kv) + (4 + a) * cfg.batch_size * arch.heads * cfg.seq_len ** 2
        attn_out_saved = False
    half = {"attention": (0 if (first and not full) else norm) + attn, "mlp": norm + 3 * a * T * i}  # mlp: silu
    # input and output, up
    width = {"attention_norm": h, "attention_output": arch.q_dim, "mlp_norm": h, "gated_product": i}
    if full:  # linear inputs: norm outputs (shared by q/k/v and by gate/up), o_proj's unless SDPA kept it, product
        half["attention"] += a * T * (h + (0 if attn_out_saved else arch.q_dim))
        half["mlp"] += a * T * (h + i)
    else:
        saved_inputs = set()
        for leaf, fan_in, _, _ in arch.linears:
            if leaf not in cfg.lora_targets:
                continue
            side = "attention" if leaf in ATTENTION_LINEARS else "mlp"
            src = LINEAR_INPUT.get(leaf, leaf)
            half[side] += ad * T * cfg.lora_r  # lora_B's input
            if cfg.lora_dropout > 0:
                # [torch] on CUDA dropout is one fused kernel (native_dropout) that saves a bool mask; elsewhere it
                # is bernoulli_ * input, which saves the mask in the input's dtype (what the CPU ledger measures)
                mask_bytes = 1 if cfg.device.startswith("cuda") else ad
                mask = 0 if (first and src == "attention_norm") else mask_bytes * T * fan_in
                half[side] += mask + ad * T * fan_in  # dropout mask and lora_A's input (the dropped-out copy)
            elif ad != a:  # [peft] each adapter casts its input to its own dtype: one saved copy per adapter
                half[side] += ad * T * fan_in
            elif src not in saved_inputs and not (src == "attention_output" and attn_out_saved):  # SDPA kept it
                saved_inputs.add(src)
                half[side] += a * T * width.get(src, fan_in)
    return {**half, "total": half["attention"] + half["mlp"]}


def activations(cfg: RunConfig, arch: Arch) -> dict:
    """Saved-for-backward bytes as backward starts, and the pieces the peak moments need."""
    a = activation_bytes(cfg)
    b, s = cfg.batch_size, cfg.seq_len
    T, h, V = b * s, arch.hidden, arch.vocab
    full = cfg.method == "full"
    head = 4 * T * h + 4 * T + (2 * a * T * h if full else 0)  # final norm (+ its bf16 input and lm_head's input)
    if cfg.loss_impl == "chunked":
        # [savers] the gradient of the hidden states, computed in forward (for Full FT it takes the place of
        # lm_head's saved input), and the head weight's when it is trained; nothing vocabulary-wide per token
        loss = (V * h * (4 if cfg.precision == "fp32" else 2)) if full else a * T * h
    else:
        loss = 4 * T * V + 8 * b * (s + 1) + 4  # fp32 log-softmax, padded labels, the normaliser
    rope = 2 * a * T * arch.head_dim  # cos and sin, once per forward
    ids = 8 * T if full else 0  # the embedding saves its indices when it is trained
    one_layer = layer_activations(cfg, arch, T, first=False)
    first_layer = layer_activations(cfg, arch, T, first=True)["total"]
    checkpointed = checkpointed_layers(cfg, arch)
    # [torch] non-reentrant checkpointing keeps each checkpointed layer's input; the others keep everything
    layers = sum(a * T * h if i in checkpointed else first_layer if i == 0 else one_layer["total"]
                 for i in range(arch.layers))
    if len(checkpointed) == arch.layers:
        rope = 0  # held by the checkpoints' closures, not saved: counted under other
    return {"total": layers + head + loss + rope + ids, "layer": one_layer, "first_layer": first_layer,
            "loss": loss, "head": head, "tokens": T, "a": a, "checkpointed": checkpointed}


def checkpointed_layers(cfg: RunConfig, arch: Arch) -> frozenset[int]:
    """The decoder layers checkpointing recomputes: every ckpt_every-th from layer 0 (transformers' every_n_layers)."""
    if not cfg.grad_checkpointing:
        return frozenset()
    return frozenset(range(0, arch.layers, cfg.ckpt_every))


# The step's phase each moment falls in, where it is not backward (the sharded moments: bench.modelling.sharding)
PHASE_OF = {"optimizer": "optimizer", "loss_forward": "forward", "first_layer_forward": "forward",
            "last_layer_forward": "forward"}


def estimate_bytes(cfg: RunConfig, arch: Arch | None = None, device_type: str | None = None) -> dict:
    """Every category at the estimated peak, the peak, and the phase it falls in."""
    from qlora.preflight import preflight

    cfg = preflight(cfg, device=False)  # the settings the architecture makes impossible; all-linear resolved
    arch = arch or read_arch(cfg)
    device_type = device_type or ("cuda" if cfg.device.startswith("cuda") else "cpu")
    st = static(cfg, arch)
    opt = optimizer_state(cfg, st, device_type)
    act = activations(cfg, arch)
    T, V, h, a = act["tokens"], arch.vocab, arch.hidden, act["a"]
    base = {"weights": st.weights, "quant_state": st.quant_state, "adapter": st.adapter, "optimizer": opt}
    # [bnb] MatMul4Bit's backward dequantises the whole widest 4-bit weight (out x in) in the compute dtype.
    dequantised = max(i * o for _, i, o, _ in arch.linears) * (4 if cfg.compute_dtype == "fp32" else 2)

    moments = {}
    chunked = cfg.loss_impl == "chunked"
    # Backward starts: every activation is live, and the loss backward holds two fp32 logits-sized gradients (the
    # chunked loss computed its gradients in forward: it scales them in place).
    # [savers] Offloading: what autograd saved went to pinned host memory as it was saved, and comes back only while
    # its own backward runs (the loss's first; a checkpointed layer's input while the layer is recomputed, the
    # recomputation itself on the device under checkpointing's own hooks).
    offload = cfg.offload_activations
    moments["backward"] = {**base, "gradients": 0, "activations": act["loss"] if offload else act["total"],
                           "other": 0 if chunked else 8 * T * V}
    if chunked:
        # [savers][ledger] The loss in forward, at its first chunk: every activation is saved, and the chunk's fp32
        # logits turning into their gradient hold three chunk x vocab fp32 buffers beside the hidden states' gradient.
        c = min(LOSS_CHUNK_TOKENS, T)
        # (offloaded: the loss's own gradient buffers are on the device until it saves them)
        moments["loss_forward"] = {**base, "gradients": 0, "activations": act["loss"] if offload else act["total"],
                                   "other": 12 * c * V + a * T * h}
    # Optimizer step: every gradient is live, activations are gone, plus the step's temporaries. In backward, one
    # tensor's step at a time: its gradient and its temporaries.
    stepped = replace(st, trainable=(max(st.trainable),)) if cfg.optimizer_in_backward else st
    moments["optimizer"] = {**base, "gradients": stepped.trainable_bytes, "activations": 0,
                            "other": optimizer_temporaries(cfg, stepped, device_type)}
    if cfg.quantized and arch.layers - 1 not in act["checkpointed"]:
        # [ledger] Backward through the last layer's MLP: the loss and head are done, a dequantised weight is live.
        moments["dequantise"] = {**base, "gradients": 0,
                                 "activations": act["layer"]["total"] if offload
                                 else act["total"] - act["loss"] - act["head"],
                                 "other": dequantised + a * T * (h + arch.inter)}
    if act["checkpointed"]:
        # [ledger] Backward through checkpointed layer k (the last checkpointed one, and layer 0): what layers 0..k
        # saved is still live (a checkpointed layer's input, another layer's activations), layer k's activations are
        # recomputed, the gradient of its output flows in, and its MLP backward holds two intermediate-sized
        # gradients (the frozen path's and the adapter's or weight's, before they are summed). The gradients of the
        # layers already done (and of the head) are live, unless each was stepped and freed in backward: for Full FT
        # that makes the first layer (processed last) the worst, for LoRA usually the last (most inputs still saved).
        p = st.element_bytes
        head_grads = (V * h + h) * p if cfg.method == "full" else 0
        layer_grads = (st.trainable_bytes - (arch.other_params * p if cfg.method == "full" else 0)) // arch.layers
        if cfg.method == "full":
            attn_grads = sum(i * o for leaf, i, o, _ in arch.linears if leaf in ATTENTION_LINEARS) * p
            widest = max(i * o for _, i, o, _ in arch.linears) * p
        else:
            attn_grads = sum(cfg.lora_r * (i + o) for leaf, i, o, _ in arch.linears
                             if leaf in cfg.lora_targets and leaf in ATTENTION_LINEARS) * p
            widest = max(cfg.lora_r * max(i, o) for leaf, i, o, _ in arch.linears if leaf in cfg.lora_targets) * p
        temps = a * T * h + 2 * a * T * arch.inter
        one = act["layer"]
        for name, k in (("recompute_last", max(act["checkpointed"])), ("recompute_first", 0)):
            done = arch.layers - 1 - k
            grads = head_grads + done * layer_grads + (layer_grads - attn_grads)
            if cfg.optimizer_in_backward:
                grads = min(grads, widest)
            below = a * T * h if offload else sum(a * T * h if i in act["checkpointed"] else act["first_layer"]
                                                  if i == 0 else one["total"] for i in range(k + 1))
            moments[name] = {**base, "gradients": grads, "activations": below + one["total"], "other": temps}
            if cfg.quantized:  # [bnb][ledger] or while MatMul4Bit holds a dequantised weight in that backward
                moments[name + "_dequantise"] = {**moments[name], "other": dequantised + a * T * (h + arch.inter)}
            if cfg.attention == "eager":
                # [ledger] the softmax backward of the recomputed layer: its MLP half and the probabilities' copy in
                # the activation dtype are freed; the fp32 gradients into and out of the softmax are live.
                probs = cfg.batch_size * arch.heads * cfg.seq_len ** 2
                moments[name + "_softmax"] = {
                    **base, "gradients": grads,
                    "activations": below + one["attention"] - a * probs,
                    "other": a * T * h + 8 * probs}
    sharding = None
    if cfg.shard != "none":  # rank 0's view of every moment (the largest rank), plus what sharding adds
        from bench.modelling.sharding import per_rank

        moments, sharding = per_rank(cfg, arch, st, act, moments, optimizer_state, optimizer_temporaries, device_type)
    for m in moments.values():
        m["peak"] = sum(m[c] for c in CATEGORIES)
    phase = max(moments, key=lambda k: moments[k]["peak"])  # the first listed wins a tie
    out = moments[phase]
    # As backward starts (the ledger's categories_at("backward")): everything saved for backward is live, the loss
    # backward's temporaries are not yet.
    start = {**(moments["backward"] if sharding else base), "gradients": 0, "activations": act["total"], "other": 0}
    return {"bytes": {c: out[c] for c in (*CATEGORIES, "peak")}, **({"sharding": sharding} if sharding else {}),
            "phase": PHASE_OF.get(phase, "backward"),
            "moments": {k: v["peak"] for k, v in moments.items()},
            "backward_start": {**{c: start[c] for c in CATEGORIES}, "total": sum(start[c] for c in CATEGORIES)}}


def largest_fitting(cfg: RunConfig, arch: Arch, field: str, capacity_ok, upper: int) -> int | None:
    """Largest value of `field` (seq_len or batch_size) in [1, upper] whose estimate passes capacity_ok(peak);
    None if even 1 does not. The estimate grows with both, so a binary search is exact."""

    def ok(v):
        return capacity_ok(estimate_bytes(replace(cfg, **{field: v}), arch)["bytes"]["peak"])

    if not ok(1):
        return None
    lo, hi = 1, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo
