"""The training spec: one typed model of a run, parsed once at the edge.

A spec comes from YAML text, a YAML file or a dict, plus dotted overrides
(`optim.lr=3e-4`). Validation reports every problem at once (`SpecError`), and relative
data paths are resolved against the spec file's folder (or the working directory), so the
`spec.yaml` written into a run folder is self-contained.
"""

from __future__ import annotations

import ast
import copy
import functools
import glob
import inspect
import io
import json
import os
import re
import tokenize
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from .errors import MISSING, Problem, SpecError
from .inputs import InputError, load_yaml, read_text

DATA_SUFFIXES = (".txt", ".md", ".text", ".jsonl", ".csv", ".parquet")


def _check_saved_dataset(path: str) -> None:
    """A folder is accepted as a dataset written by `datasets.Dataset.save_to_disk`."""
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        splits = sorted(p.name for p in Path(path).iterdir() if p.is_dir())
        raise ValueError(
            f"{path} is a DatasetDict; name one split's folder, one of: "
            + ", ".join(os.path.join(path, s) for s in splits)
        )
    if not os.path.isfile(os.path.join(path, "state.json")):
        raise ValueError(
            f"{path} is a folder but not a dataset saved with datasets' save_to_disk "
            "(no state.json); name files or a glob instead"
        )


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class LoraSpec(_Section):
    r: int = Field(8, ge=1, le=1024)  # rank of the low-rank update
    alpha: int = Field(16, gt=0)  # scaling numerator: update scaled by alpha / r (an int, as peft takes it)
    dropout: float = Field(0.05, ge=0, lt=1)  # dropout on the adapter's input
    target_modules: list[str] | None = None  # None: peft's default for the model type


class ModelSpec(_Section):
    # next-token prediction (GPT-2, Llama) or BERT-style masking
    task: Literal["causal-lm", "masked-lm"] = "causal-lm"
    pretrained: str | None = None  # local folder with a from_pretrained checkpoint
    # transformers config kwargs when building from scratch; None = a tiny default for the task
    config: dict[str, Any] | None = None
    # the weights' dtype when loaded or built; auto: a pretrained checkpoint's own dtype (its
    # config.json), else train.precision's. A bf16 checkpoint is never silently upcast.
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    lora: LoraSpec | None = None  # train a LoRA adapter only, on model.pretrained (jupyter-llm[lora])
    # recompute activations in the backward pass: less memory, more compute
    gradient_checkpointing: bool = False

    @field_validator("pretrained")
    @classmethod
    def _pretrained_exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        if not _check_files(info):
            return v
        path = _resolve(v, info)
        if path.is_dir():
            return str(path)
        if _looks_like_hub_id(v) and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", ""):
            return v  # a hub id; only usable where a hub is reachable
        raise ValueError(f"folder not found: {path}; give a local folder saved with save_pretrained")

    @field_validator("config")
    @classmethod
    def _config_has_type(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and "model_type" not in v:
            raise ValueError("needs a model_type, e.g. {model_type: gpt2, n_layer: 4}")
        return v


class TokenizerTrainSpec(_Section):
    kind: Literal["char", "bpe", "wordpiece"] = "char"  # one token per character, or subwords (vocab_size)
    vocab_size: int = Field(8000, ge=16, le=1_000_000)  # ignored for char


class TokenizerSpec(_Section):
    path: str | None = None  # defaults to model.pretrained
    train: TokenizerTrainSpec | None = None  # train a tokenizer on data.train (when there is no path)
    chat_template: str | None = None  # Jinja template for data.format chat (else the tokenizer's own)

    @field_validator("path")
    @classmethod
    def _path_exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        if not _check_files(info):
            return v
        path = _resolve(v, info)
        if not path.is_dir():
            raise ValueError(f"folder not found: {path}")
        return str(path)


class CleanSpec(_Section):
    normalize: Literal["NFC", "NFKC"] | None = None  # unicode normalisation form
    strip_control: bool = False  # drop control characters except newline, tab, carriage return
    min_chars: int = Field(1, ge=0)  # documents shorter than this (after cleaning) are dropped
    max_chars: int | None = Field(None, ge=1)  # and longer than this
    dedup: bool = False  # drop exact duplicate documents (by content hash)


class DataSpec(_Section):
    train: list[str]  # files (.txt .md .jsonl .csv .parquet), globs, or save_to_disk folders
    validation: list[str] | None = None  # None: split val_fraction off the training text
    # the tail of the training text held out, without data.validation
    val_fraction: float = Field(0.1, ge=0, le=0.5)
    text_field: str = "text"  # JSONL key / CSV, Parquet or dataset column holding the text
    # "pairs": JSONL lines with a prompt and a response; "chat": JSONL lines with a list of
    # {role, content} messages rendered by the chat template. The loss counts responses
    # (assistant turns) only.
    format: Literal["text", "pairs", "chat"] = "text"
    prompt_field: str = "prompt"  # pairs: the JSONL key of the prompt
    response_field: str = "response"  # pairs: the JSONL key of the response
    messages_field: str = "messages"  # chat: the JSONL key of the list of messages
    block_size: int = Field(64, ge=4, le=131072)  # tokens per training sequence
    mlm_probability: float = Field(0.15, gt=0, lt=1)  # masked-lm only
    clean: CleanSpec = CleanSpec()

    @field_validator("train", "validation", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("train", "validation")
    @classmethod
    def _files_exist(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if v is None:
            return v
        if not _check_files(info):
            return v
        if not v:
            raise ValueError("needs at least one file or glob")
        files: list[str] = []
        for pattern in v:
            full = str(_resolve(pattern, info))
            matches = sorted(glob.glob(full)) if glob.has_magic(full) else [full]
            matches = [m for m in matches if os.path.isfile(m) or os.path.isdir(m)]
            if not matches:
                raise ValueError(f"no file matches {full!r}")
            for m in matches:
                if os.path.isdir(m):
                    _check_saved_dataset(m)
                    continue
                if not m.endswith(DATA_SUFFIXES):
                    raise ValueError(
                        f"unsupported file type {Path(m).suffix!r} ({m}); "
                        f"use one of {', '.join(DATA_SUFFIXES)}"
                    )
                if os.path.getsize(m) == 0:
                    raise ValueError(f"file is empty: {m}")
            files += matches
        return files


class TrainSpec(_Section):
    micro_batch_size: int = Field(12, ge=1, le=65536)  # sequences per rank per micro step
    grad_accum: int = Field(1, ge=1, le=65536)  # micro steps per optimizer step
    max_steps: int = Field(2000, ge=1)  # optimizer steps
    log_every: int = Field(10, ge=1)  # steps between metrics lines
    eval_every: int = Field(250, ge=0)  # steps between validations; 0 = only at the end
    eval_batches: int = Field(20, ge=1)  # micro batches per validation
    save_every: int = Field(500, ge=0)  # steps between checkpoints; 0 = only on stop
    keep_checkpoints: int = Field(2, ge=1)  # newest complete checkpoints kept
    stop_grace_s: float = Field(120, ge=0)  # seconds a stop waits for the final checkpoint
    # seconds without any sign of progress (metrics, events, rank logs), counted from the
    # first logged step, before the job is declared hung and stopped; 0 = never
    hang_timeout_s: float = Field(1800, ge=0)
    # automatic restarts after an infrastructure failure (a rank killed by a signal, a lost
    # node, a hang, a collective that timed out, a full disk once space is back), each from
    # the newest complete checkpoint; a user error (spec, data, an exception in the code) is
    # never retried. None: 2 on a cluster (nodes/Slurm), 0 on this machine, where the same
    # failure usually comes back and the person who launched it is at hand
    max_restarts: int | None = Field(None, ge=0, le=100)
    restart_backoff_s: float = Field(10, ge=0, le=3600)  # before the first restart; doubles each time
    grad_norms_every: int = Field(0, ge=0)  # steps between per-layer gradient norms (grads.jsonl); 0 = off
    # steps between samples generated from sample_prompts during training (greedy, samples.jsonl,
    # shown as a table by step); 0 = off. Taken at the first step and at these steps
    sample_every: int = Field(0, ge=0)
    # prompts of the samples; empty: the first sample_prompt_chars characters of the validation text
    sample_prompts: list[str] = []
    sample_prompt_chars: int = Field(24, ge=1, le=4096)  # the default prompt's length
    sample_tokens: int = Field(32, ge=1, le=1024)  # new tokens per sample
    # compute precision (DeepSpeed's bf16/fp16 modes keep fp32 master weights in the optimizer);
    # auto: the weights' dtype (model.dtype)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # torch.compile (inductor) each repeated block of the model (its layers), or the whole model
    # where nothing repeats: the first steps and the first validation wait for the compiler; on
    # CPU it needs a C++ compiler (g++)
    compile: bool = False


class OptimSpec(_Section):
    # the optimizer (DeepSpeed's fused Adam for adam and adamw on GPUs, torch's on CPU ranks)
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1.0e-3, gt=0, le=10)  # peak learning rate, reached after the warmup
    min_lr: float = Field(1.0e-4, ge=0)  # floor of the cosine decay (linear decays to 0)
    weight_decay: float = Field(0.1, ge=0, le=10)  # decoupled, on matrices only (not biases and norms)
    betas: tuple[float, float] = (0.9, 0.99)  # Adam's moment decay rates
    eps: float = Field(1.0e-8, gt=0)  # Adam's epsilon
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only
    grad_clip: float = Field(1.0, ge=0)  # max global grad norm; 0 = no clipping
    # after the warmup: cosine to min_lr, linear to 0, or flat
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)  # None: min(100, max_steps // 10)

    @field_validator("betas", mode="before")
    @classmethod
    def _betas_pair(cls, v: Any) -> Any:
        if not isinstance(v, list | tuple) or len(v) != 2:
            raise ValueError("needs two numbers, e.g. [0.9, 0.99]")
        return v

    @field_validator("betas")
    @classmethod
    def _betas_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v


class DistributedSpec(_Section):
    # 1: this machine; a cluster's name (clusters.yaml), a list of hosts, or an inline cluster
    nodes: int | str | list[str] | dict[str, Any] = 1
    procs_per_node: Literal["auto"] | int = "auto"  # GPUs per node; CPU ranks when no GPU
    # auto: the least sharding whose estimate fits what the nodes have (chosen at launch)
    zero_stage: Literal[0, 1, 2, 3, "auto"] = 2
    # optimizer / optimizer+params: to host memory; nvme: the optimizer (and, under ZeRO-3, the
    # parameters) to files under nvme_path (ZeRO-Infinity); auto: the least offload that fits
    offload: Literal["none", "optimizer", "optimizer+params", "nvme", "auto"] = "none"
    # a folder on a local NVMe/SSD of every node for offload: nvme (a per-run folder inside it
    # holds the swap files, removed when the run ends)
    nvme_path: str | None = None
    # ranks that split each layer's weights (DeepSpeed AutoTP); the ranks of a node are grouped
    # into tensor-parallel groups of this size, data parallelism runs across the groups
    tensor_parallel: int = Field(1, ge=1, le=64)
    master_port: int | None = Field(None, ge=1024, le=65535)  # None: pick a free one

    @field_validator("nodes")
    @classmethod
    def _nodes(cls, v: int | str | list[str] | dict[str, Any]) -> int | str | list[str] | dict[str, Any]:
        from .cluster import resolve
        from .errors import UserError

        if isinstance(v, int) and v != 1:
            raise ValueError("1 (this machine), a cluster name, a list of hosts or a cluster mapping")
        if isinstance(v, str) and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError(f"{v!r} is not a cluster name (letters, digits, '.', '_', '-')")
        if isinstance(v, (list, dict)):
            try:
                resolve(v)  # the shape only; what the nodes have is the pre-flight's business
            except UserError as e:
                raise ValueError(str(e).removeprefix("distributed.nodes: ")) from None
        return v

    @field_validator("nvme_path")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        if v is not None and not os.path.isabs(os.path.expanduser(v)):
            raise ValueError("must be an absolute path (the same folder on every node)")
        return os.path.expanduser(v) if v is not None else v

    @field_validator("procs_per_node")
    @classmethod
    def _positive(cls, v: Any) -> Any:
        if isinstance(v, int) and not 1 <= v <= 1024:
            raise ValueError("must be 'auto' or an integer from 1 to 1024")
        return v


class EvalSpec(_Section):
    """What an evaluation measures; the spec's `eval:` section runs it when training completes."""

    checkpoint: int | Literal["final", "latest"] = "final"  # or a checkpoint's step
    files: list[str] | None = None  # held-out text files for perplexity; None: the validation split
    max_blocks: int | None = Field(None, ge=1)  # at most this many blocks for perplexity
    prompts: list[str] = []  # generate a sample from each
    references: str | None = None  # JSONL of prompt → reference lines: BLEU and ROUGE
    prompt_field: str = "prompt"  # references: the JSONL key of the prompt
    reference_field: str = "reference"  # references: the JSONL key of the reference text
    max_new_tokens: int = Field(64, ge=1, le=4096)  # tokens generated per prompt
    temperature: float = Field(0.0, ge=0, le=100)  # 0: greedy
    top_k: int | None = Field(None, ge=1)  # sample among the k likeliest tokens (temperature > 0)
    # nucleus sampling: the smallest set of tokens with this much probability
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int = Field(0, ge=0, lt=2**32)  # seeds the sampling
    batch_size: int = Field(8, ge=1, le=4096)  # blocks per forward pass for perplexity

    @field_validator("files", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("files")
    @classmethod
    def _texts_exist(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if v is None:
            return v
        if not _check_files(info):
            return v
        if not v:
            raise ValueError("needs at least one file or glob (or leave it out: the validation split)")
        out: list[str] = []
        for pattern in v:
            full = str(_resolve(pattern, info))
            matches = [
                m for m in (sorted(glob.glob(full)) if glob.has_magic(full) else [full]) if os.path.isfile(m)
            ]
            if not matches:
                raise ValueError(f"no file matches {full!r}")
            for m in matches:
                if not m.endswith((".txt", ".md", ".text")):
                    raise ValueError(
                        f"perplexity reads plain text (.txt .md .text), not {Path(m).suffix!r} ({m})"
                    )
            out += matches
        return out

    @field_validator("references")
    @classmethod
    def _jsonl_exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        if not _check_files(info):
            return v
        path = _resolve(v, info)
        if not path.is_file():
            raise ValueError(f"file not found: {path}")
        if path.suffix != ".jsonl":
            raise ValueError(f"references are JSONL lines ({{prompt, reference}}), not {path.suffix!r}")
        return str(path)


REPORT_TARGETS = ("tensorboard", "mlflow", "wandb", "csv")
ReportTarget = Literal["tensorboard", "mlflow", "wandb", "csv"]


class ReportSpec(_Section):
    """Where `report_to` sends a run (read from the run folder here, never by the ranks)."""

    tracking_uri: str | None = None  # MLflow; None: sqlite:///<runs root>/mlflow.db
    experiment: str = Field("jupyter-llm", min_length=1, max_length=256)  # MLflow experiment, W&B project
    log_model: bool = True  # MLflow: the final model as an artifact (a copy of final/)
    wandb_mode: Literal["offline", "online"] = "offline"  # offline: `wandb sync <run>/wandb` uploads later
    wandb_entity: str | None = None  # W&B team or user (online)


class Spec(_Section):
    # part of the run id; runs are found by it
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    seed: int = Field(1337, ge=0, lt=2**32)  # seeds model init, data order and dropout on every rank
    model: ModelSpec = ModelSpec()
    tokenizer: TokenizerSpec = TokenizerSpec()
    data: DataSpec
    train: TrainSpec = TrainSpec()
    optim: OptimSpec = OptimSpec()
    distributed: DistributedSpec = DistributedSpec()
    deepspeed: dict[str, Any] = {}  # raw DeepSpeed config, merged last
    eval: EvalSpec | None = None  # evaluate the final model when training completes
    # tensorboard, mlflow, wandb, csv (one or a list): the metrics, the spec and the evaluations
    report_to: list[ReportTarget] = []
    report: ReportSpec = ReportSpec()  # where and how report_to sends them (MLflow store, W&B mode)

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_list(cls, v: Any) -> Any:
        if v is None or v == "none":
            return []
        if v == "all":
            return list(REPORT_TARGETS)
        if isinstance(v, str):
            v = [part.strip() for part in v.split(",") if part.strip()]
        if isinstance(v, list) and len(set(map(str, v))) != len(v):
            raise ValueError("names a target twice")
        return v

    # -- loading -----------------------------------------------------------------------

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        overrides: list[str] | Mapping[str, Any] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        check_files: bool = True,
    ) -> Spec:
        raw = apply_overrides(dict(data), overrides or [])
        problems = _validate_cross(raw)
        try:
            spec = cls.model_validate(
                raw, context={"base_dir": Path(base_dir or os.getcwd()), "check_files": check_files}
            )
        except ValidationError as e:
            raise SpecError(validation_problems(e) + problems) from None
        problems += spec._semantic_problems()
        if problems:
            raise SpecError(problems)
        return spec

    @classmethod
    def from_yaml(
        cls,
        text: str,
        overrides: list[str] | Mapping[str, Any] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        check_files: bool = True,
    ) -> Spec:
        try:
            data = load_yaml(text, "<yaml>")
        except InputError as e:
            raise SpecError([Problem("<yaml>", MISSING, e.detail)]) from None
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise SpecError([Problem("<yaml>", data, "the spec must be a mapping (key: value lines)")])
        return cls.from_dict(data, overrides, base_dir, check_files)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], overrides: list[str] | Mapping[str, Any] | None = None
    ) -> Spec:
        p = Path(path).expanduser().resolve()
        if not p.is_file():
            raise SpecError([Problem("<file>", str(path), "spec file not found")])
        try:
            text = read_text(p)
        except InputError as e:
            raise SpecError([Problem("<file>", str(path), e.detail)]) from None
        return cls.from_yaml(text, overrides, base_dir=p.parent)

    @classmethod
    def load(cls, source: Any, overrides: list[str] | Mapping[str, Any] | None = None) -> Spec:
        """A Spec from a Spec, a dict, a path to a YAML file, or YAML text."""
        if isinstance(source, Spec):
            return cls.from_dict(source.to_dict(), overrides) if overrides else source
        if isinstance(source, Mapping):
            return cls.from_dict(source, overrides)
        if isinstance(source, os.PathLike):
            return cls.from_file(source, overrides)
        if isinstance(source, str):
            if "\n" not in source and source.endswith((".yaml", ".yml")):
                return cls.from_file(source, overrides)
            return cls.from_yaml(source, overrides)
        raise SpecError([Problem("<spec>", source, "give a dict, a Spec, YAML text or a path")])

    # -- output ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def _tensor_parallel_problems(self) -> list[Problem]:
        """What AutoTP training here does not combine with (the model's head and hidden sizes
        are checked by the pre-flight, which knows the model's shape)."""
        d, tp = self.distributed, self.distributed.tensor_parallel
        if tp == 1:
            return []
        key, out = "distributed.tensor_parallel", []
        if isinstance(d.procs_per_node, int) and d.procs_per_node % tp:
            out.append(Problem(key, tp, f"must divide distributed.procs_per_node ({d.procs_per_node}): "
                                        "a tensor-parallel group stays within one node"))  # fmt: skip
        if d.zero_stage not in (0, 1, 2):
            out.append(Problem(key, tp, f"combines with zero_stage 0, 1 or 2, not {d.zero_stage!r}: "
                                        "set distributed.zero_stage"))  # fmt: skip
        if d.offload != "none":
            out.append(Problem(key, tp, f"does not combine with offload {d.offload!r}: set offload: none"))
        if self.model.lora:
            out.append(Problem(key, tp, "does not combine with model.lora (the adapters are not split)"))
        if self.model.task != "causal-lm":
            out.append(Problem(key, tp, f"trains causal LMs; model.task is {self.model.task}"))
        return out

    def _semantic_problems(self) -> list[Problem]:
        """Checks across fields, run once every field is valid on its own."""
        out = []
        o, t, m, d = self.optim, self.train, self.model, self.distributed
        if o.min_lr > o.lr:
            out.append(Problem("optim.min_lr", o.min_lr, f"must not exceed optim.lr ({o.lr})"))
        if o.warmup_steps is not None and o.warmup_steps >= t.max_steps and t.max_steps > 1:
            out.append(
                Problem(
                    "optim.warmup_steps",
                    o.warmup_steps,
                    f"must be below train.max_steps ({t.max_steps})",
                )
            )
        if d.offload in ("optimizer+params", "nvme") and d.zero_stage not in (3, "auto"):
            what = "parameter offload" if d.offload != "nvme" else "NVMe offload (ZeRO-Infinity)"
            out.append(Problem("distributed.offload", d.offload, f"{what} needs zero_stage: 3 (or auto)"))
        if d.offload not in ("none", "auto") and d.zero_stage == 0:
            out.append(Problem("distributed.offload", d.offload, "offload needs zero_stage 1-3"))
        if d.offload == "nvme" and not d.nvme_path:
            out.append(Problem("distributed.nvme_path", None,
                               "offload: nvme needs a folder on a local NVMe/SSD, e.g. nvme_path: /local_nvme"))  # fmt: skip
        out += self._tensor_parallel_problems()
        if m.pretrained and m.config:
            out.append(Problem("model.config", m.config, "give model.pretrained or model.config, not both"))
        out += self._dtype_problems()
        if self.tokenizer.path and self.tokenizer.train:
            out.append(Problem("tokenizer.train", "...", "give tokenizer.path or tokenizer.train, not both"))
        if m.lora and not m.pretrained:
            out.append(Problem("model.lora", "...", "LoRA adapts a pretrained model: set model.pretrained"))
        if self.data.format != "text":
            fmt = self.data.format
            if m.task != "causal-lm":
                out.append(Problem("data.format", fmt, "prompt/response data trains a causal-lm"))
            for key in ("train", "validation"):
                for f in getattr(self.data, key) or []:
                    if not f.endswith(".jsonl"):
                        out.append(Problem(f"data.{key}", f, f"data.format {fmt} reads .jsonl files"))
            if fmt == "chat" and self.tokenizer.train and not self.tokenizer.chat_template:
                out.append(Problem("tokenizer.chat_template", None,
                                   "a trained tokenizer has no chat template: give one for data.format chat"))  # fmt: skip
        if self.eval is not None:
            out += eval_problems(self.eval, m.task, "eval.")
        if t.sample_every and m.task != "causal-lm":
            out.append(
                Problem("train.sample_every", t.sample_every, "samples are generated: a causal-lm only")
            )
        if self.data.validation is None and self.data.val_fraction == 0 and t.eval_every > 0:
            out.append(
                Problem(
                    "data.val_fraction",
                    0,
                    "is 0 and data.validation is unset: set one, or train.eval_every: 0",
                )
            )
        return out

    def checkpoint_dtype(self, folder: str | None = None) -> str | None:
        """The dtype a pretrained checkpoint was saved in (its config.json), if it says.
        `folder`: where the checkpoint is on this machine (a remote node's synced copy)."""
        folder = folder or self.model.pretrained
        if not folder:
            return None
        try:
            with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, ValueError):
            return None
        saved = cfg.get("dtype") or cfg.get("torch_dtype")
        return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(str(saved))

    def load_dtype(self, folder: str | None = None) -> str:
        """The dtype the weights are loaded (or built) in: fp32, bf16 or fp16."""
        if self.model.dtype != "auto":
            return self.model.dtype
        if self.model.pretrained:
            return self.checkpoint_dtype(folder) or "fp32"
        return "fp32" if self.train.precision == "auto" else self.train.precision

    def precision(self) -> str:
        """The compute precision: fp32, bf16 or fp16."""
        return self.load_dtype() if self.train.precision == "auto" else self.train.precision

    def _dtype_problems(self) -> list[Problem]:
        load, prec = self.load_dtype(), self.precision()
        if load == prec or load == "fp32":  # fp32 weights train in any precision (mixed precision)
            return []
        if self.model.dtype == "auto":  # the checkpoint's own dtype
            why = f"the checkpoint {self.model.pretrained} is {load}"
            fix = f"set model.dtype: {prec} to convert it on purpose, or train.precision: {load}"
        else:
            why = f"model.dtype is {load}"
            fix = f"set model.dtype: {prec}, or train.precision: {load}"
        what = "would upcast it (twice the memory)" if prec == "fp32" else f"does not train {load} weights"
        return [Problem("train.precision", self.train.precision, f"{prec} {what}: {why}; {fix}")]

    def tokenizer_source(self) -> str | None:
        """The folder the tokenizer loads from, or None when it is trained on the data."""
        if self.tokenizer.train is not None:
            return None
        return self.tokenizer.path or self.model.pretrained


@functools.cache
def field_help(cls: type) -> dict[str, str]:
    """The meaning of each field of a class: the comment beside it, after the comment lines just
    above it. The source's comments are the one place the spec's fields are explained; the
    reference pages and the form's help both read them from here."""
    src = inspect.getsource(cls)
    by_line: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT and "fmt:" not in tok.string and "noqa" not in tok.string:
            by_line[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = src.splitlines()
    out = {}
    for node in ast.parse(src).body[0].body:  # type: ignore[attr-defined]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above: list[str] = []
            n = node.lineno - 1
            while n >= 1 and lines[n - 1].strip().startswith("#"):
                above.insert(0, by_line.get(n, ""))
                n -= 1
            out[node.target.id] = " ".join([*above, by_line.get(node.lineno, "")]).strip()
    return out


def eval_problems(e: EvalSpec, task: str, prefix: str = "") -> list[Problem]:
    """What an evaluation cannot do for this task."""
    out = []
    if task == "masked-lm":
        for key in ("prompts", "references"):
            if getattr(e, key):
                out.append(Problem(f"{prefix}{key}", "...", "generation needs a causal-lm; a masked-lm is "
                                   "evaluated by masked-token accuracy and perplexity"))  # fmt: skip
    if e.temperature == 0 and (e.top_k or e.top_p):
        out.append(Problem(f"{prefix}temperature", 0, "top_k/top_p sample: set a temperature above 0"))
    return out


def _validate_cross(raw: dict[str, Any]) -> list[Problem]:
    """Problems pydantic cannot see per field: a missing data section, say."""
    if "data" not in raw:
        return [Problem("data", MISSING, "required: give data.train (files or globs)")]
    return []


def validation_problems(e: ValidationError) -> list[Problem]:
    """One Problem per field; the alternatives of a union field are joined with 'or'."""
    by_path: dict[str, Problem] = {}
    for err in e.errors(include_url=False):
        loc = _field_loc(err["loc"]) if err["type"] != "extra_forbidden" else err["loc"]
        path = ".".join(str(p) for p in loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key; allowed: " + ", ".join(_allowed_keys(err["loc"][:-1]))
        if err["type"] == "missing" and path == "data":
            continue  # reported by _validate_cross with a better message
        given = err.get("input", MISSING) if err["type"] != "missing" else MISSING
        if path in by_path:
            prev = by_path[path]
            by_path[path] = Problem(path, prev.given, f"{prev.message}, or {msg[0].lower()}{msg[1:]}")
        else:
            by_path[path] = Problem(path, given, msg)
    return list(by_path.values())


def _field_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """`loc` cut after the last real field: drops union tags and positions inside a value."""
    model: type[BaseModel] | None = Spec
    out: list[Any] = []
    for part in loc:
        if model is None or str(part) not in model.model_fields:
            break
        out.append(part)
        ann = model.model_fields[str(part)].annotation
        model = next((a for a in getattr(ann, "__args__", (ann,))
                      if isinstance(a, type) and issubclass(a, BaseModel)), None)  # fmt: skip
    return tuple(out) or loc


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] | None = Spec
    for part in loc:
        field = model.model_fields.get(str(part)) if model else None
        if field is None:
            return []
        ann = field.annotation
        model = next((a for a in getattr(ann, "__args__", (ann,))
                      if isinstance(a, type) and issubclass(a, BaseModel)), None)  # fmt: skip
    return list(model.model_fields) if model else []


def _check_files(info: ValidationInfo) -> bool:
    """False where a spec is read back by a job (a remote node has none of the data files)."""
    return bool((info.context or {}).get("check_files", True))


def _resolve(path: str, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir") or Path.cwd()
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else Path(base) / p


def _looks_like_hub_id(v: str) -> bool:
    parts = v.split("/")
    return len(parts) <= 2 and all(parts) and not v.startswith((".", "~"))


def apply_overrides(data: dict[str, Any], overrides: list[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a copy of `data`."""
    out = copy.deepcopy(data)
    items = overrides.items() if isinstance(overrides, Mapping) else map(split_override, overrides)
    for key, value in items:
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                where = ".".join(parts[: i + 1])
                raise SpecError([Problem(key, value, f"{where} is not a section")])
            node = nxt
        node[parts[-1]] = value
    return out


def split_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise SpecError([Problem("--set", item, "expected KEY=VALUE with a dotted key, e.g. optim.lr=3e-4")])
    try:
        return key, load_yaml(text, f"--set {key}") if text.strip() else ""
    except InputError as e:
        if e.syntax:
            return key, text  # a plain string value
        raise SpecError([Problem(key, MISSING, e.detail)]) from None


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# ZeRO-3 settings derived from the model's shape at start (DeepSpeed's defaults let a rank keep
# 1e9 gathered parameters live: more than many whole models)
ZERO3_AUTO = (
    "reduce_bucket_size",
    "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold",
    "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
)


def zero3_settings(shape: dict[str, int]) -> dict[str, int]:
    """ZeRO-3's size settings from the model's shape: the buckets as the HF Trainer sizes its
    "auto" values (hidden², 0.9·hidden², 10·hidden); the live-parameter limit (and the reuse
    distance) at two layers or the largest module, whichever is more, never above DeepSpeed's
    default 1e9, so a rank holds a couple of gathered layers, not the whole model."""
    h = max(shape["hidden_size"], 1)
    live = min(10**9, max(shape["largest_module_params"], 2 * shape["largest_layer_params"]))
    largest_param = shape.get("largest_param", shape["largest_module_params"])
    return {
        "reduce_bucket_size": h * h,
        "stage3_prefetch_bucket_size": int(0.9 * h * h),
        "stage3_param_persistence_threshold": 10 * h,
        "stage3_max_live_parameters": live,
        "stage3_max_reuse_distance": live,
        # NVMe offload: the optimizer steps (and swaps) one sub-group of parameters at a time,
        # and each parameter swap buffer holds one parameter: one layer, or the largest tensor
        "sub_group_size": max(largest_param, shape["largest_layer_params"]),
        "param_buffer_size": _round_up(largest_param, 2**20),
        # one buffer per swapped tensor of the layers that may be live at once (two, and the
        # one being prefetched), and the non-layer ones (embeddings, head)
        "param_buffer_count": max(5, 3 * shape.get("layer_tensors", 0) + 2),
    }


def _round_up(n: int, to: int) -> int:
    return -(-max(n, 1) // to) * to


def resolve_auto(ds_config: dict[str, Any], shape: dict[str, int]) -> dict[str, Any]:
    """`ds_config` with its "auto" ZeRO-3 values filled from the model's shape."""
    zero = dict(ds_config.get("zero_optimization", {}))
    derived = zero3_settings(shape)
    for key, value in zero.items():
        if value == "auto" and key in derived:
            zero[key] = derived[key]
    if isinstance(zero.get("offload_param"), dict) and zero["offload_param"].get("buffer_size") == "auto":
        zero["offload_param"] = {**zero["offload_param"], "buffer_size": derived["param_buffer_size"]}
    if isinstance(zero.get("offload_param"), dict) and zero["offload_param"].get("buffer_count") == "auto":
        zero["offload_param"] = {**zero["offload_param"], "buffer_count": derived["param_buffer_count"]}
    return {**ds_config, "zero_optimization": zero}


def swap_dir(spec: Spec, run_id: str | None) -> str | None:
    """The run's own folder under distributed.nvme_path for offload: nvme (removed at its end)."""
    if spec.distributed.offload != "nvme" or not spec.distributed.nvme_path:
        return None
    return os.path.join(spec.distributed.nvme_path, "jupyter-llm-swap", run_id or "<run id>")


def on_cpu(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config as ranks without an accelerator run it: Adam/AdamW without optimizer
    offload through torch's AdamW (`torch_adam`) with its fused CPU kernel, instead of
    DeepSpeed's FusedAdam. The update is the same; DeepSpeed's CPU FusedAdam finds its JIT build
    by probing the CPU with two py-cpuinfo subprocesses at every start (2 s of each rank's 6 s
    start-up on a 2-core machine, measured with py-spy), and torch's default on CPU is a Python
    loop over the parameters (`engine.step()` of a 4-layer GPT: 3.3 ms, fused 1.4 ms). Offloaded
    optimizers keep DeepSpeed's CPU Adam; a `torch_adam`, `fused` or `foreach` that the spec's
    `deepspeed:` section sets wins."""
    opt = ds_config.get("optimizer") or {}
    offloaded = "offload_optimizer" in (ds_config.get("zero_optimization") or {})
    if opt.get("type") not in ("Adam", "AdamW") or offloaded:
        return ds_config
    given = opt.get("params", {})
    kernel = {} if "foreach" in given else {"fused": True}  # torch takes one of the two
    return {**ds_config, "optimizer": {**opt, "params": {"torch_adam": True, **kernel, **given}}}


def deepspeed_config(spec: Spec, run_id: str | None = None) -> dict[str, Any]:
    """The DeepSpeed config a spec implies; the raw `deepspeed:` section is merged last.

    The global batch size is left for DeepSpeed to derive (micro x accum x world size),
    so the same config serves any number of ranks.
    """
    o, t, d = spec.optim, spec.train, spec.distributed
    optimizer: dict[str, Any]
    if o.name == "sgd":
        optimizer = {
            "type": "SGD",
            "params": {"lr": o.lr, "momentum": o.momentum, "weight_decay": o.weight_decay},
        }
    else:
        params: dict[str, Any] = {
            "lr": o.lr,
            "betas": list(o.betas),
            "eps": o.eps,
            "weight_decay": o.weight_decay,
        }
        if o.name == "adam":
            params["adam_w_mode"] = False
        optimizer = {"type": "AdamW" if o.name == "adamw" else "Adam", "params": params}
    warmup = min(100, t.max_steps // 10) if o.warmup_steps is None else o.warmup_steps
    warmup = min(warmup, max(t.max_steps - 1, 0))
    # DeepSpeed's schedulers need warmup_num_steps >= 1; "no warmup" is a flat warmup at full lr
    flat = warmup == 0
    warmup = max(warmup, 1)
    min_ratio = o.min_lr / o.lr
    if o.scheduler == "cosine":
        scheduler = {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": t.max_steps,
                "warmup_num_steps": warmup,
                "warmup_min_ratio": 1.0 if flat else 0.0,
                "cos_min_ratio": min_ratio,
                "warmup_type": "linear",
            },
        }
    elif o.scheduler == "linear":
        scheduler = {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": t.max_steps,
                "warmup_num_steps": warmup,
                "warmup_min_lr": o.lr if flat else 0.0,
                "warmup_max_lr": o.lr,
                "warmup_type": "linear",
            },
        }
    else:
        scheduler = {
            "type": "WarmupLR",
            "params": {
                "warmup_num_steps": warmup,
                "warmup_min_lr": o.lr if flat else 0.0,
                "warmup_max_lr": o.lr,
                "warmup_type": "linear",
            },
        }
    zero: dict[str, Any] = {"stage": d.zero_stage}  # "auto": chosen at launch (jupyter_llm.fit)
    if d.offload in ("optimizer", "optimizer+params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if d.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    swap = swap_dir(spec, run_id)
    extra: dict[str, Any] = {}
    if d.offload == "nvme":
        # ZeRO-Infinity: the optimizer's states and the parameters live in files; the buffers
        # that stage them through memory are sized from the model (DeepSpeed's defaults hold
        # 5 x 1e8 parameters and whole 1e9-element sub-groups)
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": swap, "pin_memory": False,
                                     "buffer_count": 4, "fast_init": False}  # fmt: skip
        zero["offload_param"] = {"device": "nvme", "nvme_path": swap, "pin_memory": False,
                                 "buffer_count": "auto", "buffer_size": "auto", "max_in_cpu": 0}  # fmt: skip
        zero["sub_group_size"] = "auto"
        # parameter prefetch through the NVMe swapper runs out of swap buffers (DeepSpeed
        # issue 3062, seen here with 0.19.8): parameters are fetched when needed instead
        zero["stage3_prefetch_bucket_size"] = 0
        extra["aio"] = {"block_size": 1048576, "queue_depth": 8, "intra_op_parallelism": 1,
                        "single_submit": False, "overlap_events": True}  # fmt: skip
    if d.zero_stage == 3:
        # lets the worker gather a full state dict for the final save_pretrained export
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        # sized from the model's shape by the worker (train.model.zero3_settings), as the HF
        # Trainer's "auto" values are; a value in the spec's deepspeed: section wins
        zero.update({k: "auto" for k in ZERO3_AUTO if k not in zero})
    if d.tensor_parallel > 1:  # DeepSpeed's AutoTP training: every linear layer split N ways
        extra["tensor_parallel"] = {"autotp_size": d.tensor_parallel}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": o.grad_clip,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "zero_optimization": zero,
        "bf16": {"enabled": spec.precision() == "bf16"},
        "fp16": {"enabled": spec.precision() == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 2**31 - 1,  # we log ourselves; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
        **extra,
    }
    return deep_merge(cfg, spec.deepspeed)
