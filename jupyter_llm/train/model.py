"""Worker-side model building and the FLOPs arithmetic behind MFU."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
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


TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def pretrained_folder(spec: Spec) -> str | None:
    """Where the pretrained checkpoint is on this machine (a remote node without a shared
    filesystem gets the folder synced into its run folder)."""
    return os.environ.get("JUPYTER_LLM_PRETRAINED") or spec.model.pretrained


def model_config(spec: Spec, vocab: int) -> Any:
    """The transformers config of the model a spec trains, with room for `vocab` tokens."""
    import transformers as tf

    if spec.model.pretrained:
        cfg = tf.AutoConfig.from_pretrained(pretrained_folder(spec))
        cfg.vocab_size = max(int(cfg.vocab_size), vocab)  # embeddings grow for a larger tokenizer
        return cfg
    kwargs = dict(spec.model.config or DEFAULT_CONFIGS[spec.model.task])
    model_type = kwargs.pop("model_type")
    cfg = tf.AutoConfig.for_model(model_type, **kwargs)
    # at least the tokenizer's vocabulary; a larger configured size pads it (e.g. 50304
    # for GPT-2, a multiple of 64 that tensor cores like)
    cfg.vocab_size = max(vocab, int(kwargs.get("vocab_size") or 0))
    for attr in ("n_positions", "max_position_embeddings"):
        if getattr(cfg, attr, None) is not None and getattr(cfg, attr) < spec.data.block_size:
            setattr(cfg, attr, spec.data.block_size)
    return cfg


def build_model(spec: Spec, tok: Any, ds_config: dict[str, Any] | None = None) -> Any:
    """The model, in the spec's load dtype. With a ZeRO-3 `ds_config` it is built (or loaded)
    partitioned: DeepSpeed's zero.Init through Transformers' integration, so no rank ever holds
    the whole model; peft's LoRA layers are added to the partitioned model."""
    import torch
    import transformers as tf

    auto = tf.AutoModelForCausalLM if spec.model.task == "causal-lm" else tf.AutoModelForMaskedLM
    folder = pretrained_folder(spec)
    dtype = getattr(torch, TORCH_DTYPES[spec.load_dtype(folder)])
    with zero3_init(ds_config):
        model: Any = None
        if spec.model.pretrained and folder and _zero3(ds_config):
            # built partitioned, then filled one module at a time (Transformers' own ZeRO-3
            # load first reads the whole checkpoint into rank 0's memory)
            base_cfg = tf.AutoConfig.from_pretrained(folder)
            model = _with_sdpa(lambda **kw: auto.from_config(base_cfg, dtype=dtype, **kw))
            if not load_partitioned(model, folder):
                model = None  # names or shapes Transformers converts: its loader below
        if spec.model.pretrained:
            if model is None:
                model = _with_sdpa(lambda **kw: auto.from_pretrained(folder, dtype=dtype, **kw))
            if len(tok) > model.get_input_embeddings().num_embeddings:
                model.resize_token_embeddings(len(tok))
        else:
            cfg = model_config(spec, len(tok))
            for t in ("bos", "eos", "pad"):
                if getattr(tok, f"{t}_token_id", None) is not None:
                    setattr(cfg, f"{t}_token_id", getattr(tok, f"{t}_token_id"))
            model = _with_sdpa(lambda **kw: auto.from_config(cfg, dtype=dtype, **kw))
        fused_gelu(model)
        if spec.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if spec.model.lora:
            model = add_lora(model, spec)
    return model


def fused_gelu(model: Any) -> int:
    """Replace Transformers' `gelu_new` modules (GPT-2, GPT-J, Phi…: the tanh GELU written out in
    seven tensor ops, each with its own backward) with PyTorch's fused kernel of the same formula;
    the config is left as it is. Returns how many were replaced (measured: a 4-layer GPT's step on
    CPU, 12 % of it in gelu_new's forward alone)."""
    from transformers.activations import GELUTanh, NewGELUActivation

    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())
                n += 1
    return n


def repeated_blocks(model: Any) -> list[Any]:
    """The model's repeated blocks: the members of each ModuleList whose members (two or more) are
    all of one class — a transformer's layers (GPT-2's `transformer.h`, Llama's `model.layers`,
    BERT's `encoder.layer`), found whatever wraps them (peft, DeepSpeed). Lists inside a found
    block (a mixture's experts) are left to it. Empty where the model repeats nothing."""
    import torch

    found: list[Any] = []
    inside: set[int] = set()
    for m in model.modules():  # pre-order: an outer list before the lists in its blocks
        if id(m) in inside:
            for c in m.children():
                inside.add(id(c))
            continue
        members = list(m.children()) if isinstance(m, torch.nn.ModuleList) else []
        if len(members) >= 2 and len({type(c) for c in members}) == 1:
            found += members
            inside.update(id(c) for c in members)
    return found


def compile_blocks(model: Any) -> int:
    """torch.compile each repeated block in place (regional compilation; names, state dict and
    hooks unchanged) and return how many. Blocks of one class run one compiled graph (Dynamo's
    guards do not tell their weights apart), so the compiler works once per kind of block and
    mode (training, no-grad evaluation) rather than over the whole model: measured on a 4-layer
    GPT on CPU, 19 s of compiling before the first steps against 40 s for the whole model (3 s
    against 7 s with the compiler's cache warm), at the same step time. What lies outside the
    blocks (embeddings, the head, the loss) stays eager. 0: nothing repeats; compile the whole
    model instead."""
    blocks = repeated_blocks(model)
    for b in blocks:
        b.compile(dynamic=False)
    return len(blocks)


def _zero3(ds_config: dict[str, Any] | None) -> bool:
    return bool(ds_config and ds_config.get("zero_optimization", {}).get("stage") == 3)


def load_partitioned(model: Any, folder: str) -> bool:
    """Copy a safetensors checkpoint into a ZeRO-3-partitioned model one module at a time:
    rank 0 reads only that module's tensors, DeepSpeed scatters them to the ranks' shards, so
    no rank holds more than one module of the checkpoint. False, with nothing copied, when the
    checkpoint's names or shapes do not cover every parameter (renamed or converted weights,
    .bin files): the caller then loads with Transformers."""
    from pathlib import Path

    import deepspeed
    import torch.distributed as dist
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    where: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            where.update({k: (f, tuple(h.get_slice(k).get_shape())) for k in h.keys()})  # noqa: SIM118
    prefix = getattr(model, "base_model_prefix", "") or ""

    def key_of(name: str) -> str | None:  # a task model's checkpoint may lack its base prefix
        short = name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else None
        return next(
            (k for k in (name, short, f"{prefix}.{name}" if prefix else None) if k and k in where), None
        )

    keys: dict[str, str] = {}
    for name, p in model.named_parameters():
        key = key_of(name)
        shape = tuple(getattr(p, "ds_shape", None) or p.shape)
        if key is None or where[key][1] != shape:
            return False
        keys[name] = key
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    for mod_name, module in model.named_modules():
        full = lambda n, m=mod_name: f"{m}.{n}" if m else n  # noqa: E731
        # a tied parameter is named once (by its first module): the others skip it
        own = [(keys[full(n)], p) for n, p in module.named_parameters(recurse=False) if full(n) in keys]
        if own:
            with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=0):
                if rank0:
                    for key, p in own:
                        with safe_open(str(where[key][0]), framework="pt") as h:
                            p.data.copy_(h.get_tensor(key))
        for n, b in module.named_buffers(recurse=False):  # buffers are whole on every rank
            key = key_of(full(n))
            if key is not None and where[key][1] == tuple(b.shape):
                with safe_open(str(where[key][0]), framework="pt") as h:
                    b.data.copy_(h.get_tensor(key))
    return True


def add_lora(model: Any, spec: Spec) -> Any:
    """The spec's LoRA adapters (peft) on `model`: only they train."""
    import peft

    lora = spec.model.lora
    assert lora is not None
    task = peft.TaskType.CAUSAL_LM if spec.model.task == "causal-lm" else peft.TaskType.FEATURE_EXTRACTION
    config = peft.LoraConfig(task_type=task, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora.target_modules)  # fmt: skip
    return peft.get_peft_model(model, config)


@contextlib.contextmanager
def zero3_init(ds_config: dict[str, Any] | None) -> Iterator[None]:
    """Inside: Transformers builds and loads models partitioned (ZeRO-3's zero.Init), when
    `ds_config` is a ZeRO-3 config; otherwise nothing changes."""
    if not _zero3(ds_config):
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(ds_config)  # Transformers holds only a weak reference to it
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep


def numel(p: Any) -> int:
    """A parameter's element count, also when ZeRO-3 has partitioned it away (ds_numel)."""
    return int(getattr(p, "ds_numel", None) or p.numel())


def ndim(p: Any) -> int:
    shape = getattr(p, "ds_shape", None)
    return len(shape) if shape is not None else int(p.dim())


def layer_key(name: str) -> str:
    """The layer a parameter belongs to: its path up to the first block index
    ("transformer.h.3.attn.c_attn.weight" -> "transformer.h.3"), else its module path."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or name


def shape_of(model: Any) -> dict[str, int]:
    """What ZeRO-3's buffers are sized from: parameters (all, trainable), the largest single
    module (often the embeddings: gathered whole) and the largest layer (one repeated block)."""
    seen: dict[int, Any] = {id(p): p for p in model.parameters()}
    cfg = getattr(model, "config", None)
    hidden = int(getattr(cfg, "hidden_size", 0) or 0)
    layers: dict[str, int] = {}  # the repeated blocks ("transformer.h.3"), not the embeddings
    tensors: dict[str, int] = {}  # per block, the tensors too big to stay resident under ZeRO-3
    for name, p in model.named_parameters():
        key = layer_key(name)
        if key.split(".")[-1].isdigit():
            layers[key] = layers.get(key, 0) + numel(p)
            tensors[key] = tensors.get(key, 0) + (numel(p) > 10 * hidden)
    largest_module = max(
        (sum(numel(p) for p in m.parameters(recurse=False)) for m in model.modules()), default=0
    )
    return {
        "params": sum(numel(p) for p in seen.values()),
        "largest_param": max((numel(p) for p in seen.values()), default=0),
        "trainable_params": sum(numel(p) for p in seen.values() if p.requires_grad),
        "largest_module_params": largest_module,
        "largest_layer_params": max(layers.values(), default=0),
        "layer_tensors": max(tensors.values(), default=0),
        "hidden_size": hidden,
        "num_heads": int(getattr(cfg, "num_attention_heads", 0) or 0),
        "num_kv_heads": int(
            getattr(cfg, "num_key_value_heads", 0) or getattr(cfg, "num_attention_heads", 0) or 0
        ),
        "vocab_size": int(getattr(cfg, "vocab_size", 0) or 0),
        "num_layers": int(getattr(cfg, "num_hidden_layers", 0) or 0),
    }


def meta_shape(spec: Spec, vocab: int) -> dict[str, int]:
    """`shape_of` the spec's model built on the meta device: no memory, no weights read."""
    import torch
    import transformers as tf

    auto = tf.AutoModelForCausalLM if spec.model.task == "causal-lm" else tf.AutoModelForMaskedLM
    with torch.device("meta"):
        model = auto.from_config(model_config(spec, vocab))
        if spec.model.lora:  # the adapters are what trains (and what the optimizer holds)
            model = add_lora(model, spec)
    return shape_of(model)


def _with_sdpa(make: Any) -> Any:
    """PyTorch SDPA attention where the architecture has it, its default otherwise."""
    try:
        return make(attn_implementation="sdpa")
    except (ValueError, ImportError):
        return make()


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only; biases and norm weights (1-d) are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and ndim(p) >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and ndim(p) < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def flops_per_token(model: Any, seq_len: int) -> float:
    """Training FLOPs per token: 6·N + 12·L·H·Q·T (PaLM appendix B; nanoGPT's estimate_mfu).

    N excludes position embeddings, which cost no matmul FLOPs.
    """
    cfg = model.config
    n = sum(numel(p) for p in model.parameters())
    for name, p in model.named_parameters():
        if "position_embeddings" in name or name.endswith("wpe.weight"):
            n -= numel(p)
    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    return 6 * n + 12 * layers * heads * head_dim * seq_len


def peak_flops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)
