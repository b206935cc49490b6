"""The Spec: loading, overrides, every-problem-at-once errors, the derived DeepSpeed config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from jupyter_llm import launch
from jupyter_llm.errors import SpecError
from jupyter_llm.runs import RunStore
from jupyter_llm.spec import Spec, deep_merge, deepspeed_config, on_cpu

BAD = yaml.safe_load((Path(__file__).parent / "specs" / "bad_specs.yaml").read_text())


@pytest.fixture
def files(tmp_path: Path, corpus: Path) -> dict[str, str]:
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "model").mkdir()
    return {
        "corpus": str(corpus),
        "binfile": str(tmp_path / "blob.bin"),
        "emptyfile": str(tmp_path / "empty.txt"),
        "modeldir": str(tmp_path / "model"),
    }


def _fill(text: str, files: dict[str, str]) -> str:
    for k, v in files.items():
        text = text.replace("{" + k + "}", v)
    return text


def test_corpus_is_large() -> None:
    assert len(BAD) >= 50
    assert len({c["id"] for c in BAD}) == len(BAD)


@pytest.mark.parametrize("case", BAD, ids=[c["id"] for c in BAD])
def test_bad_spec_fails_before_anything_starts(case: dict[str, Any], files: dict[str, str]) -> None:
    base = {"data": {"train": files["corpus"]}}
    if case["spec"] is None:
        text = "seed: 1"
    elif case["problem"] == "<yaml>":
        text = case["spec"]
    else:
        text = yaml.safe_dump(deep_merge(base, yaml.safe_load(_fill(case["spec"], files))))
    with pytest.raises(SpecError) as err:
        launch(text)
    paths = [p.path for p in err.value.problems]
    assert case["problem"] in paths, f"expected a problem at {case['problem']}, got {err.value}"
    assert RunStore().list() == []  # nothing was created, nothing started
    msg = str(err.value)
    assert case["problem"] in msg and len(msg.splitlines()) <= 1 + len(paths)


def test_every_problem_reported_at_once(corpus: Path) -> None:
    with pytest.raises(SpecError) as err:
        Spec.from_dict({"data": {"train": str(corpus), "block_size": 0},
                        "optim": {"lr": -1, "scheduler": "step"},
                        "distributed": {"zero_stage": 4}, "bogus": 1})  # fmt: skip
    paths = {p.path for p in err.value.problems}
    assert paths == {"data.block_size", "optim.lr", "optim.scheduler", "distributed.zero_stage", "bogus"}
    unknown = next(p for p in err.value.problems if p.path == "bogus")
    assert "allowed" in unknown.message and "optim" in unknown.message
    stage = next(p for p in err.value.problems if p.path == "distributed.zero_stage")
    assert stage.given == 4 and "0" in stage.message and "3" in stage.message


def test_unknown_nested_key_lists_allowed(corpus: Path) -> None:
    with pytest.raises(SpecError) as err:
        Spec.from_dict({"data": {"train": str(corpus)}, "optim": {"learning_rate": 1}})
    (p,) = err.value.problems
    assert p.path == "optim.learning_rate" and "lr" in p.message and "min_lr" in p.message


def test_overrides_dotted_and_typed(corpus: Path) -> None:
    spec = Spec.from_dict(
        {"data": {"train": str(corpus)}},
        ["optim.lr=3e-4", "distributed.zero_stage=3", "optim.betas=[0.8, 0.9]", "name=abc"],
    )
    assert spec.optim.lr == pytest.approx(3e-4)
    assert spec.distributed.zero_stage == 3
    assert spec.optim.betas == (0.8, 0.9)
    assert spec.name == "abc"


@pytest.mark.parametrize("bad", ["optim.lr", "=3", "optim..lr=1", "data.train.x=1"])
def test_bad_override(bad: str, corpus: Path) -> None:
    with pytest.raises(SpecError):
        Spec.from_dict({"data": {"train": str(corpus)}}, [bad])


def test_relative_paths_resolve_against_spec_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("hello")
    (tmp_path / "sub" / "b.txt").write_text("world")
    f = tmp_path / "sub" / "spec.yaml"
    f.write_text("data:\n  train: '*.txt'\n")
    spec = Spec.from_file(f)
    assert spec.data.train == [str(tmp_path / "sub" / "a.txt"), str(tmp_path / "sub" / "b.txt")]
    # the resolved spec round-trips through YAML unchanged (what spec.yaml in a run holds)
    assert Spec.from_yaml(spec.to_yaml()) == spec


def test_load_dispatch(corpus: Path, tmp_path: Path) -> None:
    d = {"data": {"train": str(corpus)}}
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    a, b, c = Spec.load(d), Spec.load(str(f)), Spec.load(yaml.safe_dump(d))
    assert a == b == c
    assert Spec.load(a) is a
    assert Spec.load(a, ["seed=7"]).seed == 7
    with pytest.raises(SpecError, match="not found"):
        Spec.load(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config(stage: int, corpus: Path) -> None:
    spec = Spec.from_dict({
        "data": {"train": str(corpus)},
        "train": {"micro_batch_size": 4, "grad_accum": 3, "max_steps": 100},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "grad_clip": 0.5, "warmup_steps": 10, "betas": [0.9, 0.95]},
        "distributed": {"zero_stage": stage},
        "model": {"dtype": "bf16"},
        "deepspeed": {"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": 2.0},
    })  # fmt: skip
    cfg = deepspeed_config(spec)
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 3
    assert "train_batch_size" not in cfg  # DeepSpeed derives it from the world size
    assert cfg["gradient_clipping"] == 2.0  # the raw section wins
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 1000  # merged, not replaced
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1},
    }
    sched = cfg["scheduler"]
    assert sched["type"] == "WarmupCosineLR"
    assert sched["params"]["total_num_steps"] == 100 and sched["params"]["warmup_num_steps"] == 10
    assert sched["params"]["cos_min_ratio"] == pytest.approx(0.1)
    assert ("stage3_gather_16bit_weights_on_model_save" in cfg["zero_optimization"]) == (stage == 3)


def test_offload_and_schedulers(corpus: Path) -> None:
    base = {"data": {"train": str(corpus)}}
    cfg = deepspeed_config(
        Spec.from_dict(base, ["distributed.zero_stage=3", "distributed.offload=optimizer+params"])
    )
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    cfg = deepspeed_config(Spec.from_dict(base, ["optim.scheduler=linear", "optim.name=sgd"]))
    assert cfg["scheduler"]["type"] == "WarmupDecayLR" and cfg["optimizer"]["type"] == "SGD"
    cfg = deepspeed_config(Spec.from_dict(base, ["optim.scheduler=constant", "optim.name=adam"]))
    assert cfg["scheduler"]["type"] == "WarmupLR" and cfg["optimizer"]["params"]["adam_w_mode"] is False


def test_example_spec_is_valid() -> None:
    spec = Spec.from_file(Path(__file__).parent.parent / "examples" / "shakespeare-char.yaml")
    assert spec.name == "shakespeare-char" and Path(spec.data.train[0]).is_file()


def _checkpoint(tmp_path: Path, dtype: str | None) -> str:
    """A folder that looks like a saved checkpoint of `dtype` (its config.json says so)."""
    import json

    d = tmp_path / f"ckpt-{dtype}"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", **({"dtype": dtype} if dtype else {})}))
    return str(d)


def test_load_dtype_and_precision_are_coherent(corpus: Path, tmp_path: Path) -> None:
    base = {"data": {"train": str(corpus)}}
    # from a config: fp32 weights, any precision (DeepSpeed keeps fp32 master weights)
    assert Spec.from_dict(base).load_dtype() == "fp32" and Spec.from_dict(base).precision() == "fp32"
    s = Spec.from_dict(base, ["train.precision=bf16"])
    assert (s.load_dtype(), s.precision()) == ("bf16", "bf16")
    assert deepspeed_config(s)["bf16"]["enabled"]
    # a bf16 checkpoint loads and trains in bf16 by default: never silently upcast
    bf16 = {"data": base["data"], "model": {"pretrained": _checkpoint(tmp_path, "bfloat16")}}
    s = Spec.from_dict(bf16)
    assert (s.load_dtype(), s.precision()) == ("bf16", "bf16") and deepspeed_config(s)["bf16"]["enabled"]
    with pytest.raises(SpecError) as e:
        Spec.from_dict(bf16, ["train.precision=fp32"])
    msg = str(e.value)
    assert "train.precision" in msg and "upcast" in msg and "is bf16" in msg and "model.dtype: fp32" in msg
    s = Spec.from_dict(bf16, ["train.precision=fp32", "model.dtype=fp32"])  # upcast on purpose
    assert (s.load_dtype(), s.precision()) == ("fp32", "fp32") and not deepspeed_config(s)["bf16"]["enabled"]
    with pytest.raises(SpecError, match="does not train bf16 weights"):
        Spec.from_dict(bf16, ["train.precision=fp16"])
    with pytest.raises(SpecError, match=r"model\.dtype is fp16"):
        Spec.from_dict(base, ["model.dtype=fp16", "train.precision=fp32"])
    # an old checkpoint without a dtype in its config is fp32; old specs keep their meaning
    s = Spec.from_dict({"data": base["data"], "model": {"pretrained": _checkpoint(tmp_path, None)}})
    assert s.load_dtype() == "fp32"
    s = Spec.from_dict(base, ["model.dtype=bf16"])  # what model.dtype: bf16 meant before train.precision
    assert (s.load_dtype(), s.precision()) == ("bf16", "bf16")


def test_zero3_sizes_are_derived_from_the_shape_unless_given(corpus: Path) -> None:
    from jupyter_llm.spec import ZERO3_AUTO, resolve_auto, zero3_settings

    base = {"data": {"train": str(corpus)}, "distributed": {"zero_stage": 3}}
    cfg = deepspeed_config(Spec.from_dict(base))
    assert all(cfg["zero_optimization"][k] == "auto" for k in ZERO3_AUTO)
    assert (
        "stage3_max_live_parameters"
        not in deepspeed_config(Spec.from_dict(base, ["distributed.zero_stage=2"]))["zero_optimization"]
    )
    # a 24-layer, 1280-wide GPT-2 shape: ~64 M embedding parameters, ~20 M per block
    shape = {"hidden_size": 1280, "largest_module_params": 64_328_960, "largest_layer_params": 19_677_440,
             "params": 536_000_000, "trainable_params": 536_000_000, "num_layers": 24}  # fmt: skip
    z = zero3_settings(shape)
    assert z["reduce_bucket_size"] == 1280**2 and z["stage3_prefetch_bucket_size"] == int(0.9 * 1280**2)
    assert z["stage3_param_persistence_threshold"] == 12_800
    assert z["stage3_max_live_parameters"] == z["stage3_max_reuse_distance"] == 64_328_960  # not 1e9
    assert resolve_auto(cfg, shape)["zero_optimization"]["stage3_max_live_parameters"] == 64_328_960
    # the spec's deepspeed: section wins over the derived value
    given = Spec.from_dict({**base, "deepspeed": {"zero_optimization": {"stage3_max_live_parameters": 123}}})
    assert (
        resolve_auto(deepspeed_config(given), shape)["zero_optimization"]["stage3_max_live_parameters"] == 123
    )


def test_cpu_ranks_take_torch_adamw_unless_offloaded_or_told(corpus: Path) -> None:
    """CPU ranks run Adam/AdamW through torch's fused CPU kernel (DeepSpeed's CPU FusedAdam
    probes the CPU in two subprocesses at every start); an offloaded optimizer keeps DeepSpeed's
    CPU Adam, SGD is left alone and what the spec's `deepspeed:` section says wins."""

    def params(**sections: Any) -> dict[str, Any]:
        spec = Spec.from_dict({"data": {"train": str(corpus)}, **sections})
        return on_cpu(deepspeed_config(spec))["optimizer"]["params"]

    plain = params()
    assert (
        plain["torch_adam"] is True
        and plain["lr"] == Spec.from_dict({"data": {"train": str(corpus)}}).optim.lr
    )
    assert params(optim={"name": "adam"})["adam_w_mode"] is False  # still Adam, through torch
    assert "torch_adam" not in params(distributed={"zero_stage": 2, "offload": "optimizer"})
    assert "torch_adam" not in params(optim={"name": "sgd"})
    told = {"optimizer": {"params": {"torch_adam": False}}}
    assert params(deepspeed=told)["torch_adam"] is False
    assert plain["fused"] is True and "fused" not in params(optim={"name": "sgd"})
    looped = params(deepspeed={"optimizer": {"params": {"foreach": True}}})
    assert looped["foreach"] is True and "fused" not in looped  # torch refuses both at once
    assert params(deepspeed={"optimizer": {"params": {"fused": False}}})["fused"] is False


def test_the_worker_clips_where_deepspeed_would_clip_per_parameter(corpus: Path) -> None:
    """ZeRO-0 in fp32 without TP: the worker clips (and keeps the norm); ZeRO, fp16/bf16 or TP,
    also when only the spec's `deepspeed:` section turns them on: DeepSpeed's optimizer does."""
    from jupyter_llm.train.loop import worker_clip

    def clip(**sections: Any) -> float:
        spec = Spec.from_dict({"data": {"train": str(corpus)}, "distributed": {"zero_stage": 0}, **sections})
        return worker_clip(deepspeed_config(spec))

    assert clip() == 1.0 and clip(optim={"grad_clip": 0.5}) == 0.5
    assert clip(optim={"grad_clip": 0}) == 0.0
    assert clip(distributed={"zero_stage": 0, "procs_per_node": 2, "tensor_parallel": 2}) == 0.0
    assert clip(distributed={"zero_stage": 2}) == 0.0
    assert clip(deepspeed={"zero_optimization": {"stage": 1}}) == 0.0
    assert clip(deepspeed={"bf16": {"enabled": True}}) == 0.0
