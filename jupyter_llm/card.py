"""The model card: `final/README.md` in Hugging Face's convention, from the run folder alone.

YAML front matter (library_name, pipeline_tag, base_model for a fine-tune, tags, datasets by
file name, model-index with the evaluation of the final model), then the model, the data with
its content hashes, the evaluation, the hyperparameters, the training curve, the framework
versions and how to load it. Written when a run completes (the supervisor) and again when an
evaluation of its final model completes, so the card always carries the newest result.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import yaml

from .files import read_json
from .folder import CARD_FILE, EVALS_DIR, FINAL_DIR, MANIFEST_FILE, RunFolder
from .summary import eval_numbers, fmt_duration

PIPELINE_TAG = {"causal-lm": "text-generation", "masked-lm": "fill-mask"}
METRIC_NAMES = {"perplexity": "Perplexity", "eval_loss": "Loss (nats/token)", "masked_accuracy": "Masked accuracy",
                "bleu": "BLEU", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L"}  # fmt: skip


def final_evaluation(run: RunFolder) -> dict[str, Any] | None:
    """The newest completed evaluation of the run's final model (eval.json), if any."""
    found = []
    for d in (run.path / EVALS_DIR).glob("*"):
        res = read_json(d / "eval.json")
        if res and res.get("checkpoint") == "final":
            found.append((d.name, res))
    return max(found, key=lambda x: x[0])[1] if found else None


def param_count(folder: Path) -> int | None:
    """Parameters in a from_pretrained folder, from its safetensors headers (no torch)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    n = 0
    for f in files:
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, t in header.items():
            if name != "__metadata__":
                count = 1
                for d in t["shape"]:
                    count *= d
                n += count
    return n


def _base_model(pretrained: str | None) -> str | None:
    """The hub id a local pretrained folder came from (its config's _name_or_path), else its name."""
    if not pretrained:
        return None
    cfg = read_json(Path(pretrained) / "config.json") or {}
    name = str(cfg.get("_name_or_path") or "")
    if name.count("/") == 1 and not os.path.exists(name):
        return name
    return Path(pretrained).name


def front_matter(run: RunFolder, result: dict[str, Any] | None) -> dict[str, Any]:
    spec = run.spec
    files = [Path(f).name for f in spec.data.train]
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": PIPELINE_TAG[spec.model.task]}
    if base := _base_model(spec.model.pretrained):
        meta["base_model"] = base
    tags = ["jupyter-llm", "deepspeed", spec.model.task]
    if spec.model.lora:
        tags += ["lora", "peft"]
    meta["tags"] = tags
    meta["datasets"] = files
    numbers = eval_numbers(result or {})
    if numbers:
        hashes = (read_json(run.path / MANIFEST_FILE) or {}).get("data_files") or {}
        first = spec.data.train[0]
        dataset: dict[str, Any] = {"name": ", ".join(files), "type": "text"}
        if hashes.get(first):
            dataset["revision"] = f"sha256:{hashes[first]}"
        meta["model-index"] = [{
            "name": spec.name,
            "results": [{
                "task": {"type": PIPELINE_TAG[spec.model.task]},
                "dataset": dataset,
                "metrics": [{"type": k, "value": round(v, 6), "name": METRIC_NAMES[k]} for k, v in numbers.items()],
            }],
        }]  # fmt: skip
    return meta


def _curve(run: RunFolder) -> list[str]:
    metrics = run.metrics()
    train = [m for m in metrics if m.get("loss") is not None]
    val = [m for m in metrics if m.get("val_loss") is not None]
    if not train:
        return ["No training metrics were logged."]
    lines = ["| step | loss | val_loss |", "|---:|---:|---:|"]
    picks = sorted(
        {train[round(i * (len(train) - 1) / 5)]["step"] for i in range(6)} | {v["step"] for v in val[-3:]}
    )
    by_train = {m["step"]: m["loss"] for m in train}
    by_val = {m["step"]: m["val_loss"] for m in val}
    for s in picks:
        lv, vv = by_train.get(s), by_val.get(s)
        lines.append(f"| {s} | {'' if lv is None else f'{lv:.4f}'} | {'' if vv is None else f'{vv:.4f}'} |")
    lowest = min(train, key=lambda m: m["loss"])
    lines.append("")
    lines.append(f"Lowest training loss {lowest['loss']:.4f} at step {lowest['step']}"
                 + (f"; lowest validation loss {min(by_val.values()):.4f}." if by_val else "."))  # fmt: skip
    return lines


def render(run: RunFolder) -> str:
    spec, st = run.spec, run.status()
    result = final_evaluation(run)
    manifest = read_json(run.path / MANIFEST_FILE) or {}
    final = run.path / FINAL_DIR
    cfg = read_json(final / "config.json") or {}
    n = param_count(final)
    out = ["---", yaml.safe_dump(front_matter(run, result), sort_keys=False).rstrip(), "---", ""]
    kind = "masked language model" if spec.model.task == "masked-lm" else "causal language model"
    what = f"a {cfg.get('model_type', 'transformers')} {kind}"
    if n:
        what += f" with {n / 1e6:.2f} M parameters"
    origin = f"fine-tuned from `{spec.model.pretrained}`" if spec.model.pretrained else "trained from scratch"
    out += [f"# {spec.name}", "",
            f"This is {what}, {origin} with [jupyter-llm](https://pypi.org/project/jupyter-llm/) "
            f"(DeepSpeed), run `{run.id}`.", ""]  # fmt: skip
    if spec.model.lora:
        out += ["The weights here are the base model with the LoRA adapter merged in; the adapter alone is in "
                "`adapter/`.", ""]  # fmt: skip
    out += ["## Training data", "", "| file | sha256 |", "|---|---|"]
    for f, h in (manifest.get("data_files") or {f: None for f in spec.data.train}).items():
        out.append(f"| `{Path(f).name}` | `{h or '?'}` |")
    out += ["", f"Format `{spec.data.format}`, blocks of {spec.data.block_size} tokens.", ""]
    out += ["## Evaluation", ""]
    numbers = eval_numbers(result or {})
    if numbers:
        assert result is not None
        held = (result.get("perplexity") or {}).get("source", "the validation split")
        out += [f"Final model, held-out data: {held}.", "", "| metric | value |", "|---|---:|"]
        out += [f"| {METRIC_NAMES[k]} | {v:.4f} |" for k, v in numbers.items()]
    else:
        out.append(
            "Not evaluated yet: `jupyter-llm eval RUN` (or the spec's `eval:` section) adds the results here."
        )
    t, o, d = spec.train, spec.optim, spec.distributed
    ws = st.get("world_size") or "?"
    hp = [("steps", t.max_steps), ("micro batch per rank", t.micro_batch_size), ("gradient accumulation", t.grad_accum),
          ("ranks", ws), ("optimizer", o.name), ("learning rate", f"{o.lr:g} ({o.scheduler}, min {o.min_lr:g})"),
          ("weight decay", o.weight_decay), ("precision", t.precision), ("ZeRO stage", d.zero_stage),
          ("offload", d.offload), ("tensor parallel", d.tensor_parallel), ("seed", spec.seed)]  # fmt: skip
    out += ["", "## Training procedure", "", "| hyperparameter | value |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in hp]
    if st.get("started_at") and st.get("ended_at"):
        from datetime import datetime

        took = (
            datetime.fromisoformat(st["ended_at"]) - datetime.fromisoformat(st["started_at"])
        ).total_seconds()
        out += ["", f"Trained in {fmt_duration(took)} of wall time ({st.get('attempt', 1)} attempt(s))."]
    out += ["", "<details><summary>The whole spec</summary>", "", "```yaml", spec.to_yaml().rstrip(), "```", "",
            "</details>", "", "## Training curve", ""]  # fmt: skip
    out += _curve(run)
    vers = manifest.get("versions") or {}
    out += ["", "## Framework versions", ""]
    out += [f"- {k} {v}" for k, v in vers.items() if v]
    if manifest.get("git_sha"):
        out.append(f"- started from git commit `{manifest['git_sha']}`")
    auto = "AutoModelForMaskedLM" if spec.model.task == "masked-lm" else "AutoModelForCausalLM"
    out += ["", "## How to use", "", "```python", f"from transformers import AutoTokenizer, {auto}", "",
            f'model = {auto}.from_pretrained("{final}")', f'tokenizer = AutoTokenizer.from_pretrained("{final}")',
            "```"]  # fmt: skip
    if spec.model.lora:
        out += ["", "The adapter alone, on its base model:", "", "```python", "from peft import PeftModel", "",
                f'base = {auto}.from_pretrained("{spec.model.pretrained}")',
                f'model = PeftModel.from_pretrained(base, "{final / "adapter"}")', "```"]  # fmt: skip
    return "\n".join(out) + "\n"


def write(run: RunFolder) -> Path | None:
    """(Re)write final/README.md; None when the run has no final model."""
    final = run.path / FINAL_DIR
    if not (final / "config.json").is_file():
        return None
    text = render(run)
    tmp = final / f".{CARD_FILE}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, final / CARD_FILE)
    return final / CARD_FILE


def read(run: RunFolder) -> dict[str, Any] | None:
    """The card's front matter, parsed; None without a card."""
    path = run.path / FINAL_DIR / CARD_FILE
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    _, head, _ = text.split("---\n", 2)
    meta = yaml.safe_load(head)
    return meta if isinstance(meta, dict) else None


def as_markdown(text: str) -> str:
    """A card for a notebook's Markdown output: the front matter as a YAML block."""
    if text.startswith("---\n") and "\n---\n" in text[4:]:
        head, body = text[4:].split("\n---\n", 1)
        return f"**Model card** (`final/README.md`)\n\n```yaml\n{head}\n```\n{body}"
    return text
