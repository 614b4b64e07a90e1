"""Memory savers the stack has no CPU-capable library for: a chunked cross-entropy and activation offloading.

Chunked cross-entropy (RunConfig.loss_impl "chunked"). transformers computes the whole sequence's logits
(tokens x vocab), upcasts them to fp32 and saves their log-softmax for backward: at 7B and 2048 tokens that is
0.24 GiB saved and twice that again in the loss backward. Here the head and the loss run `LOSS_CHUNK_TOKENS` tokens
at a time and each chunk's gradients are computed at once, in forward (Liger's fused linear cross-entropy does the
same in one Triton kernel): what is kept for backward is the gradient of the hidden states (tokens x hidden) and,
when the head is trained, of its weight, and no full-sequence logits ever exist. The libraries that do this are GPU
kernels: Apple's cut-cross-entropy (CCE is Triton, CUDA only; its `torch_compile` fallback materialises the whole
logits, and under a Python dispatch mode such as the memory ledger it runs as plain eager code) and Liger (Triton,
CUDA only). Neither saves anything on a CPU, so this one stands in for them everywhere.

Activation offloading (RunConfig.offload_activations): `torch.autograd.graph.save_on_cpu`'s hooks, except that
parameters (and tensors under 1 KiB) stay where they are: a parameter saved for backward is on the device anyway,
and copying it would only add host memory and traffic (torchtune's OffloadActivations skips them for the same
reason). Under non-reentrant checkpointing these hooks see only each checkpointed layer's input, which is what
checkpointing keeps; the recomputation inside a layer stays on the device.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
LOSS_CHUNK_TOKENS = 128  # tokens per chunk: one chunk's fp32 logits at a 32k vocabulary are 16 MiB
OFFLOAD_MIN_BYTES = 1024


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of hidden @ weight.T over `target` (-100 ignored), divided by `count`, a chunk of rows at
    a time; the gradients are computed in forward and held for backward."""

    @staticmethod
    def forward(ctx, hidden, weight, target, count: float, chunk: int, training: bool):
        grad_hidden = torch.empty_like(hidden) if training and ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if training and ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], target[start:start + chunk]
            logits = (h @ weight.t()).float()  # transformers' arithmetic: the head in the model's dtype, then fp32
            valid = t != IGNORE_INDEX
            picked = t.masked_fill(~valid, 0)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, picked[:, None]).squeeze(1)) * valid).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(sum of losses)/d(logits) = softmax - one-hot, on counted rows only; scaled by 1/count
            grad = logits.sub_(lse[:, None]).exp_()
            grad.scatter_add_(1, picked[:, None], -valid[:, None].to(grad.dtype))
            grad.mul_((valid.to(grad.dtype) / count)[:, None])
            grad = grad.to(hidden.dtype)
            if grad_hidden is not None:
                torch.mm(grad, weight, out=grad_hidden[start:start + chunk])
            if grad_weight is not None:
                grad_weight.addmm_(grad.t(), h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden.mul_(grad_out.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(grad_out.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                          num_items_in_batch=None, chunk_tokens: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """transformers' causal-LM loss (labels shifted left by one, -100 ignored, mean over the counted tokens, or
    sum / num_items_in_batch when a trainer passes it) of `head(hidden)`, computed chunk by chunk. `head` is a
    plain Linear without bias (the output head of every bundled architecture; adapters never target it)."""
    if type(head) is not nn.Linear or head.bias is not None:
        raise TypeError(f"chunked loss needs a bias-free nn.Linear head; got {type(head).__name__}")
    target = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(hidden.device)
    count = int((target != IGNORE_INDEX).sum()) if num_items_in_batch is None else int(num_items_in_batch)
    # grad mode is off inside an autograd Function's forward: whether to make gradients is read here (evaluating
    # with labels computes the loss only)
    return _ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), head.weight, target,
                                            float(max(count, 1)), chunk_tokens, torch.is_grad_enabled())


def use_chunked_loss(model: nn.Module) -> None:
    """Give a transformers causal LM (the bare model, before PEFT wraps it) a forward that computes its loss with
    `chunked_cross_entropy` whenever it is given labels (and no logits then); without labels (scoring, generation)
    its own forward runs unchanged. PEFT's wrappers call this forward, so LoRA and QLoRA get it too."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    own = model.forward
    if model.get_decoder() is None or model.get_output_embeddings() is None:
        raise TypeError(f"{type(model).__name__} has no decoder and output head to chunk the loss over")

    def forward(self, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None:
            return own(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        kwargs.pop("logits_to_keep", None)
        out = self.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        # the head as it is now (an adapter on it would make it no plain Linear: chunked_cross_entropy refuses that)
        loss = chunked_cross_entropy(out.last_hidden_state, self.get_output_embeddings(), labels, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=None)

    model.forward = types.MethodType(forward, model)


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """torch.autograd.graph.save_on_cpu (pinned memory), leaving parameters and tiny tensors on the device.
    A parameter is known by its storage: a Linear saves `weight.t()`, a view that is not a Parameter itself."""

    def __init__(self, params=()):
        kept = {p.untyped_storage().data_ptr() for p in params}

        def pack(t: torch.Tensor):
            if (t.device.type == "cpu" or t.nbytes < OFFLOAD_MIN_BYTES or isinstance(t, nn.Parameter)
                    or t.untyped_storage().data_ptr() in kept):
                return (None, t)
            host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=True)
            host.copy_(t)
            return (t.device, host)

        def unpack(packed):
            device, t = packed
            return t if device is None else t.to(device, non_blocking=True)

        super().__init__(pack, unpack)


def offload_activations(model: nn.Module) -> None:
    """Run the model's forward under OffloadActivations (the hooks then hold for every tensor autograd saves in it,
    and in the loss, which the forward computes)."""
    own = model.forward

    def forward(self, *args, **kwargs):
        with OffloadActivations(self.parameters()):  # read each call: PEFT adds adapters after this
            return own(*args, **kwargs)

    model.forward = types.MethodType(forward, model)
