"""Hugging Face ``transformers`` models as model specs, unchanged: Llama and GPT-2.

``--model llama`` and ``--model gpt2`` build ``LlamaForCausalLM`` (RMSNorm, rotary embeddings,
SwiGLU, grouped-query attention) and ``GPT2LMHeadModel`` (``Conv1D`` projections, tied head)
from a config made in code (no download), sized by ``--layers --hidden --heads --context``.
:func:`llama_spec` and :func:`gpt2_spec` are also the starting point for your own spec
(docs/model-parallel.md). ``transformers`` is the optional extra ``mpitrain[hf]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mpitrain.errors import ConfigError, with_hint
from mpitrain.parallel.convert import TensorPlan, register_linear
from mpitrain.parallel.spec import ParallelSpec, SpecStage

if TYPE_CHECKING:
    from mpitrain.config import TrainConfig


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError(with_hint(
            "the Hugging Face models need the transformers package",
            "pip install 'mpitrain[hf]' (or pip install transformers)")) from None
    from transformers.pytorch_utils import Conv1D
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # a byte vocabulary: its token-id warnings are noise
    # GPT-2's projections: y = x W + b with W (in, out), i.e. nn.Linear's weight transposed
    register_linear(Conv1D, lambda m: (m.weight.t(), m.bias))
    return transformers


def _hf_init(module: nn.Module, root: nn.Module) -> None:
    """The model's own ``_init_weights`` (what ``from_config`` would draw), module by module."""
    root._init_weights(module)  # type: ignore[operator]


def _run(block: nn.Module, h: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    out = block(h, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # type: ignore[no-any-return]


def llama_forward(stage: SpecStage, x: torch.Tensor) -> torch.Tensor:
    """LlamaModel's forward, one stage of it: rotary embeddings on every stage, causal
    attention by SDPA (no mask tensor), the head's logits on the last."""
    inner: Any = stage.get_submodule("model")
    h = inner.embed_tokens(x.long()) if stage.first else x
    # the attention sees the whole sequence (its q, k, v layers gather it): full positions
    length = h.shape[1] * (stage.tp.size if stage.sequence_split() else 1)
    pos = torch.arange(length, device=h.device).unsqueeze(0)
    rope = inner.rotary_emb(h, position_ids=pos)
    for block in stage.own_blocks():
        h = _run(block, h, attention_mask=None, position_embeddings=rope, position_ids=pos)
    if not stage.last:
        return h
    out: torch.Tensor = stage.get_submodule("lm_head")(inner.norm(h))
    return out


def gpt2_forward(stage: SpecStage, x: torch.Tensor) -> torch.Tensor:
    """GPT2Model's forward, one stage of it (token + position embeddings on the first)."""
    t: Any = stage.get_submodule("transformer")
    h: torch.Tensor
    if stage.first:
        tokens = x.long()  # this rank's positions: the embedding's rows are its part
        h = t.drop(t.wte(tokens) + t.wpe(stage.positions(tokens.shape[1], tokens.device)))
    else:
        h = x
    for block in stage.own_blocks():
        h = _run(block, h, attention_mask=None)
    if not stage.last:
        return h
    out: torch.Tensor = stage.get_submodule("lm_head")(t.ln_f(h))
    return out


def _mlp_width(hidden: int) -> int:
    """SwiGLU's width as Llama sizes it: about 8/3 of the model width, a multiple of 32."""
    return -(-8 * hidden // 3 // 32) * 32


def kv_heads(heads: int) -> int:
    """Grouped-query attention: half as many key/value heads (all of them below 4 heads)."""
    return heads // 2 if heads >= 4 and heads % 2 == 0 else heads


def llama_spec(cfg: TrainConfig, vocab: int = 256) -> ParallelSpec:
    """``LlamaForCausalLM`` sized by the config: tensor plan, 1 stage per block range."""
    tf = _transformers()
    kv = kv_heads(cfg.heads)
    hc = tf.LlamaConfig(vocab_size=vocab, hidden_size=cfg.hidden,
                        intermediate_size=_mlp_width(cfg.hidden),
                        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                        num_key_value_heads=kv, max_position_embeddings=cfg.context,
                        tie_word_embeddings=False, attn_implementation="sdpa")
    layer = "model.layers.*."
    plan = TensorPlan(
        {"model.embed_tokens": "embedding",
         layer + "self_attn.q_proj": "column", layer + "self_attn.k_proj": "column",
         layer + "self_attn.v_proj": "column", layer + "self_attn.o_proj": "row",
         layer + "mlp.gate_proj": "column", layer + "mlp.up_proj": "column",
         layer + "mlp.down_proj": "row", "lm_head": "head",
         # --sequence-parallel: the norms run on a part of the sequence, their output gathered
         layer + "input_layernorm": "sequence-norm",
         layer + "post_attention_layernorm": "sequence-norm", "model.norm": "sequence-norm"},
        widths={"attention heads": cfg.heads, "key/value heads": kv})
    return ParallelSpec(
        name="llama", build=lambda: tf.LlamaForCausalLM(hc), plan=plan,
        blocks="model.layers", pre=("model.embed_tokens",), post=("model.norm", "lm_head"),
        forward=llama_forward, init=_hf_init, seed=cfg.seed,
        sequence_parallel=cfg.sequence_parallel,
        meta={"model": "llama", "vocab": vocab, "context": cfg.context, "hidden": cfg.hidden,
              "heads": cfg.heads, "kv_heads": kv, "layers": cfg.layers})


def gpt2_spec(cfg: TrainConfig, vocab: int = 256) -> ParallelSpec:
    """``GPT2LMHeadModel`` sized by the config; its head is tied to the token embedding."""
    tf = _transformers()
    hc = tf.GPT2Config(vocab_size=vocab, n_positions=cfg.context, n_embd=cfg.hidden,
                       n_layer=cfg.layers, n_head=cfg.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                       attn_pdrop=0.0, attn_implementation="sdpa")
    block = "transformer.h.*."
    plan = TensorPlan(
        {"transformer.wte": "embedding", block + "attn.c_attn": "column-qkv",
         block + "attn.c_proj": "row", block + "mlp.c_fc": "column",
         block + "mlp.c_proj": "row", "lm_head": "head", block + "ln_1": "sequence-norm",
         block + "ln_2": "sequence-norm", "transformer.ln_f": "sequence-norm"},
        divide=(block + "attn.split_size", block + "attn.num_heads"),
        widths={"attention heads": cfg.heads})
    return ParallelSpec(
        name="gpt2", build=lambda: tf.GPT2LMHeadModel(hc), plan=plan, blocks="transformer.h",
        pre=("transformer.wte", "transformer.wpe"), post=("transformer.ln_f", "lm_head"),
        forward=gpt2_forward, init=_hf_init, seed=cfg.seed,
        sequence_parallel=cfg.sequence_parallel,
        tied={"lm_head.weight": "transformer.wte.weight"},
        meta={"model": "gpt2", "vocab": vocab, "context": cfg.context, "hidden": cfg.hidden,
              "heads": cfg.heads, "layers": cfg.layers})


def hf_reference_loss(spec: ParallelSpec, stage: SpecStage, tokens: torch.Tensor) -> float:
    """The loss ``transformers`` computes for ``tokens`` with the dense stage's weights
    loaded into a fresh model (tests: the spec runs the model as Hugging Face does)."""
    model = spec.build()
    sd = dict(stage.state_dict())
    conv = {n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    for name in list(sd):
        if name.rpartition(".")[0] in conv and name.endswith(".weight"):
            sd[name] = sd[name].t()
    model.load_state_dict(sd, strict=False)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=tokens[:, :-1]).logits
    return float(torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)))
