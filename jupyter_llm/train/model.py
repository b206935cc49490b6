"""Worker-side model building and the FLOPs arithmetic behind MFU."""

from __future__ import annotations

import os
from typing import Any

from ..spec import Spec

DEFAULT_CONFIGS: dict[str, dict[str, Any]] = {
    # tiny defaults, small enough to train on a laptop CPU
    "causal-lm": {"model_type": "gpt2", "n_layer": 4, "n_head": 4, "n_embd": 128},
    "masked-lm": {
        "model_type": "bert",
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "hidden_size": 128,
        "intermediate_size": 512,
    },
}

# dense bf16 peak FLOP/s by device-name fragment (vendor datasheets, without sparsity)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def build_model(spec: Spec, tok: Any) -> Any:
    import transformers as tf

    auto = tf.AutoModelForCausalLM if spec.model.task == "causal-lm" else tf.AutoModelForMaskedLM
    if spec.model.pretrained:
        # a remote node without a shared filesystem gets the folder synced into its run folder
        path = os.environ.get("JUPYTER_LLM_PRETRAINED") or spec.model.pretrained
        model = _with_sdpa(lambda **kw: auto.from_pretrained(path, **kw))
        if len(tok) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tok))
    else:
        kwargs = dict(spec.model.config or DEFAULT_CONFIGS[spec.model.task])
        model_type = kwargs.pop("model_type")
        cfg = tf.AutoConfig.for_model(model_type, **kwargs)
        # at least the tokenizer's vocabulary; a larger configured size pads it (e.g. 50304
        # for GPT-2, a multiple of 64 that tensor cores like)
        cfg.vocab_size = max(len(tok), int(kwargs.get("vocab_size") or 0))
        for attr in ("n_positions", "max_position_embeddings"):
            if getattr(cfg, attr, None) is not None and getattr(cfg, attr) < spec.data.block_size:
                setattr(cfg, attr, spec.data.block_size)
        for t in ("bos", "eos", "pad"):
            if getattr(tok, f"{t}_token_id", None) is not None:
                setattr(cfg, f"{t}_token_id", getattr(tok, f"{t}_token_id"))
        model = _with_sdpa(lambda **kw: auto.from_config(cfg, **kw))
    if spec.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if spec.model.lora:
        import peft

        lora = spec.model.lora
        task = peft.TaskType.CAUSAL_LM if spec.model.task == "causal-lm" else peft.TaskType.FEATURE_EXTRACTION
        model = peft.get_peft_model(
            model,
            peft.LoraConfig(
                task_type=task,
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
            ),
        )
    return model


def _with_sdpa(make: Any) -> Any:
    """PyTorch SDPA attention where the architecture has it, its default otherwise."""
    try:
        return make(attn_implementation="sdpa")
    except (ValueError, ImportError):
        return make()


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only; biases and norm weights (1-d) are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def flops_per_token(model: Any, seq_len: int) -> float:
    """Training FLOPs per token: 6·N + 12·L·H·Q·T (PaLM appendix B; nanoGPT's estimate_mfu).

    N excludes position embeddings, which cost no matmul FLOPs.
    """
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    for name, p in model.named_parameters():
        if "position_embeddings" in name or name.endswith("wpe.weight"):
            n -= p.numel()
    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    return 6 * n + 12 * layers * heads * head_dim * seq_len


def peak_flops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)
