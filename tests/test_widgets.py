"""The widgets at the Python level: the form's validation and round trip, the dashboard fed by
a metrics file that the test appends to, the runs table. (The browser test renders them.)"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ipywidgets as w
import pytest

from conftest import tiny_spec, wait_for
from jupyter_llm.files import append_jsonl, read_json, write_json_atomic
from jupyter_llm.runs import Run, RunStore
from jupyter_llm.spec import Spec
from jupyter_llm.widgets import Dashboard, RunsTable, SpecForm


def form_for(corpus: Path, **sections: Any) -> SpecForm:
    return SpecForm(Spec.from_dict(tiny_spec(corpus, **sections)), estimate_memory=False)


def fake_run(corpus: Path, name: str = "dash", max_steps: int = 100) -> Run:
    """A run folder as the supervisor leaves it while running (no job behind it)."""
    import os

    import psutil

    run = RunStore().create(Spec.from_dict(tiny_spec(corpus, name=name, train={"max_steps": max_steps})))
    st = read_json(run.path / "status.json") or {}
    me = psutil.Process()
    write_json_atomic(run.path / "status.json",
                      {**st, "state": "running", "pid": os.getpid(), "pid_create_time": me.create_time()})  # fmt: skip
    return run


def metric(step: int, loss: float, t: float | None = None) -> dict[str, Any]:
    return {"step": step, "time": time.time() if t is None else t, "attempt": 1, "loss": loss, "lr": 1e-3,
            "grad_norm": 0.5, "tokens_per_s": 1234.0, "mfu": None, "peak_flops": None, "mem_mb": 321.0,
            "mem_kind": "rss"}  # fmt: skip


def set_state(run: Run, state: str) -> None:
    st = read_json(run.path / "status.json") or {}
    write_json_atomic(run.path / "status.json", {**st, "state": state})


def until(cond: Any, timeout: float = 10.0) -> Any:
    return wait_for(cond, timeout, "the widget to update", poll=0.02)


# -- the form -----------------------------------------------------------------------------


def test_blank_form_names_the_missing_field_and_disables_launch() -> None:
    form = SpecForm(estimate_memory=False)
    assert form.spec is None
    assert "needs at least one file" in form.fields["data.train"].error.value
    assert form.launch_button.disabled and form.dry_button.disabled and form.cell_button.disabled
    assert "1 problem(s)" in form.status.value


def test_every_change_is_validated_at_once(corpus: Path) -> None:
    form = form_for(corpus)
    assert form.spec is not None and not form.launch_button.disabled
    # widget kinds follow the schema
    lr = form.fields["optim.lr"]
    slider = lr.view.children[0]
    assert isinstance(slider, w.FloatLogSlider) and (slider.min, slider.max) == (-6, 0)
    assert isinstance(form.fields["train.micro_batch_size"].widget, w.IntText)  # never clamps
    assert list(form.fields["distributed.zero_stage"].widget.options) == [0, 1, 2, 3, "auto"]
    assert list(form.fields["optim.scheduler"].widget.options) == ["cosine", "linear", "constant"]
    assert form.fields["distributed.offload"].widget.options[0] == "none"
    # a cross-field problem appears beside its field, and clears when fixed
    form.fields["optim.min_lr"].widget.value = 0.5
    assert form.spec is None and "must not exceed optim.lr" in form.fields["optim.min_lr"].error.value
    assert form.launch_button.disabled
    form.fields["optim.min_lr"].widget.value = 1e-5
    assert form.spec is not None and form.fields["optim.min_lr"].error.value == ""
    # YAML-typed fields: bad YAML, then a bad type, then good
    form.fields["optim.warmup_steps"].widget.value = "[1"
    assert "not valid YAML" in form.fields["optim.warmup_steps"].error.value
    form.fields["optim.warmup_steps"].widget.value = "ten"
    assert "valid integer" in form.fields["optim.warmup_steps"].error.value
    form.fields["optim.warmup_steps"].widget.value = "7"
    assert form.spec is not None and form.spec.optim.warmup_steps == 7
    # a path that does not exist is named beside the data field
    form.fields["data.train"].widget.value = str(corpus) + "\n/nowhere/*.txt"
    assert "no file matches" in form.fields["data.train"].error.value
    # the log slider changes the learning rate (rounded to 3 digits); a typed value is exact
    form.fields["data.train"].widget.value = str(corpus)
    slider.value = 10**-3.5
    assert form.spec is not None and form.spec.optim.lr == 0.000316
    lr.widget.value = 0.0005
    assert form.spec.optim.lr == 0.0005 and slider.value == pytest.approx(0.0005)
    slider.value = 10**-3.3  # the browser's echo of the slider snapped to its step
    assert form.spec.optim.lr == 0.0005


def test_the_form_never_changes_a_value_silently_helps_and_shows_what_applies(corpus: Path) -> None:
    form = form_for(corpus)
    # out-of-range numbers stay as typed and are problems beside their fields
    form.set("train.max_steps", -5)
    assert form.fields["train.max_steps"].widget.value == -5
    assert "greater than or equal to 1" in form.fields["train.max_steps"].error.value
    assert form.spec is None and form.launch_button.disabled and "1 problem(s)" in form.summary.value
    form.set("data.val_fraction", 1.5)
    assert form.fields["data.val_fraction"].widget.value == 1.5
    assert "less than or equal to 0.5" in form.fields["data.val_fraction"].error.value
    form.set("train.max_steps", 10)
    form.set("data.val_fraction", 0.2)
    assert form.spec is not None and form.summary.value == "" and not form.launch_button.disabled
    # every field carries its meaning from the spec's source, its bounds and its default
    for key, f in form.fields.items():
        assert f.widget.tooltip and not f.widget.tooltip.startswith("(no help"), key
    assert form.fields["train.max_steps"].widget.tooltip == "Optimizer steps. Allowed: ≥ 1. Default: 2000."
    assert "Allowed: > 0 and ≤ 10" in form.fields["optim.lr"].widget.tooltip
    # only the fields that apply to the task, the data format and the optimizer are shown
    assert form.shown("data.text_field") and not form.shown("data.messages_field")
    assert not form.shown("data.mlm_probability") and not form.shown("optim.momentum")
    form.set("data.format", "chat")
    assert form.shown("data.messages_field") and form.shown("tokenizer.chat_template")
    assert not form.shown("data.text_field")
    form.set("model.task", "masked-lm")
    assert form.shown("data.mlm_probability")
    form.set("optim.name", "sgd")
    assert form.shown("optim.momentum") and not form.shown("optim.betas")
    # a hidden field still holds its value, and a field with a problem is shown whatever the rule
    assert form.value["data"]["text_field"] == "text"
    form.set("optim.name", "adamw")
    form.set("optim.momentum", 2.0)
    assert not form.shown("optim.momentum") or "less than 1" in form.fields["optim.momentum"].error.value


def test_round_trip_form_spec_form(corpus: Path) -> None:
    spec = Spec.from_dict(tiny_spec(corpus, data={"train": [str(corpus)], "val_fraction": 0.2, "block_size": 48,
                                                  "clean": {"dedup": True, "normalize": "NFKC"}},
                                    optim={"lr": 2e-3, "betas": [0.8, 0.95], "scheduler": "linear"},
                                    deepspeed={"wall_clock_breakdown": True}))  # fmt: skip
    form = SpecForm(spec, estimate_memory=False)
    assert form.spec == spec
    again = SpecForm(form.spec, estimate_memory=False)
    assert again.value == form.value and again.spec == spec
    # the equivalent cell gives the same spec
    head, body = form.cell_text().split("\n", 1)
    assert head == f"%%llm_train {spec.name}"
    assert Spec.from_yaml(body, [f"name={spec.name}"]) == spec


def test_cell_text_runs_as_a_real_magic(ip: Any, corpus: Path) -> None:
    form = form_for(corpus, optim={"lr": 5e-4, "min_lr": 1e-5})
    head, body = form.cell_text().split("\n", 1)
    dry = ip.run_cell_magic("llm_train", head.split(" ", 1)[1] + " --dry-run", body)
    assert dry.spec == form.spec


def test_side_panel_follows_the_fields(corpus: Path) -> None:
    form = form_for(corpus)
    assert "jupyter_llm.launcher.ranks" in form.command.value
    assert '"stage": 2' in form.ds_config.value
    form.fields["distributed.zero_stage"].widget.value = 3
    assert '"stage": 3' in form.ds_config.value
    form.fields["distributed.offload"].widget.value = "optimizer"
    assert '"offload_optimizer"' in form.ds_config.value
    form.fields["distributed.offload"].widget.value = "none"
    form.fields["distributed.zero_stage"].widget.value = 1
    form.fields["distributed.tensor_parallel"].widget.value = 2  # the layout, from the field
    assert '"autotp_size": 2' in form.ds_config.value
    assert "2 rank(s) = 1 data-parallel x 2 tensor-parallel" in form.command.value


def test_memory_estimate_runs_off_the_kernel_thread(corpus: Path) -> None:
    t0 = time.perf_counter()
    form = SpecForm(Spec.from_dict(tiny_spec(corpus)), estimate_memory=True)
    assert time.perf_counter() - t0 < 5  # the estimate (torch + DeepSpeed in a subprocess) is not awaited
    until(lambda: "ZeRO 3" in form.memory.value, timeout=180)
    assert "parameters" in form.memory.value
    # a spec that fits itself shows every candidate, its estimate, and the one chosen
    form = SpecForm(Spec.from_dict(tiny_spec(corpus, distributed={"zero_stage": "auto", "offload": "auto"})),
                    estimate_memory=True)  # fmt: skip
    until(lambda: "ZeRO stage and offload" in form.memory.value, timeout=180)
    assert "(chosen)" in form.memory.value and "least sharding and offload" in form.memory.value


def test_form_clones_an_earlier_run(corpus: Path, ip: Any) -> None:
    run = fake_run(corpus, name="earlier")
    form = SpecForm(run.id, estimate_memory=False)
    assert form.spec == run.spec
    assert ip.run_line_magic("llm_form", "earlier").spec == run.spec


# -- the dashboard ------------------------------------------------------------------------


def test_dashboard_follows_a_metrics_file(corpus: Path) -> None:
    run = fake_run(corpus, max_steps=100)
    (run.path / "logs").mkdir(exist_ok=True)
    dash = Dashboard(run, interval=0.05)
    view = dash.views[0]
    assert len(view.loss.x) == 0 and dash.live and "running" in view.title.value
    t0 = time.time()
    for i, step in enumerate(range(10, 60, 10)):
        append_jsonl(run.path / "metrics.jsonl", metric(step, 3.0 - 0.1 * i, t0 + i))
    append_jsonl(run.path / "metrics.jsonl", {"step": 50, "time": t0 + 5, "attempt": 1, "val_loss": 2.5})
    append_jsonl(
        run.path / "grads.jsonl", {"step": 50, "time": t0, "norms": {"transformer.h.0": 0.3, "lm": 0.9}}
    )
    (run.path / "logs" / "rank0.log").write_text("hello from rank 0\nstep 50\n")
    until(lambda: len(view.loss.x) == 5 and len(view.val.x) == 1)
    assert list(view.loss.x) == [10, 20, 30, 40, 50] and list(view.loss.y) == pytest.approx(
        [3.0, 2.9, 2.8, 2.7, 2.6]
    )
    assert list(view.panels["tokens_per_s"].y) == [1234.0] * 5
    assert view.bar.value == 50 and view.bar.max == 100
    assert "step 50/100 (50%)" in view.bar_label.value and "ETA 0m05s" in view.bar_label.value
    until(lambda: "hello from rank 0" in dash.logs.value)
    assert "1,234" in dash.stats.value and "321 MB RSS" in dash.stats.value and "n/a" in dash.stats.value
    assert list(dash.grad_bars.x) == ["transformer.h.0", "lm"] and list(dash.grad_bars.y) == [0.3, 0.9]
    # a resumed attempt logs step 50 again: the curve keeps one point per step, the newest
    append_jsonl(run.path / "metrics.jsonl", metric(50, 1.5))
    until(lambda: list(view.loss.y)[-1] == 1.5)
    assert len(view.loss.x) == 5
    # a launch that fitted itself: the rank's peak beside the estimate it was chosen by
    write_json_atomic(run.path / "fit.json", {"resources": {"gpu_free": []}, "candidates": [
        {"chosen": True, "device_gib": 0.25, "host_gib": 0.25, "zero_stage": 3, "offload": "nvme"}]})  # fmt: skip
    append_jsonl(run.path / "metrics.jsonl", {**metric(55, 2.5), "mem_peak_mb": 400.0})
    until(lambda: "peak 400 MB of 512 MB estimated" in dash.stats.value)
    # the run ends: the badge says so, Stop is disabled, and the reader thread ends
    set_state(run, "completed")
    until(lambda: not dash.live)
    assert "completed" in view.title.value and view.stop.disabled and view.resume.disabled
    assert view.bar.bar_style == "success"
    assert "dash" in dash._repr_mimebundle_()["text/plain"]


def test_dashboard_updates_are_throttled(corpus: Path) -> None:
    run = fake_run(corpus, max_steps=10_000)
    dash = Dashboard(run, interval=0.25)
    redraws: list[float] = []
    dash.views[0].loss.observe(lambda _c: redraws.append(time.monotonic()), names="x")
    t0 = time.monotonic()
    step = 0
    while time.monotonic() - t0 < 2.0:  # a writer far faster than the redraw rate
        step += 1
        append_jsonl(run.path / "metrics.jsonl", metric(step, 1.0))
        time.sleep(0.002)
    until(lambda: len(dash.views[0].loss.x) == step)
    set_state(run, "completed")
    until(lambda: not dash.live)
    assert step > 200
    assert 2 <= len(redraws) <= 2.0 / 0.25 + 3, len(redraws)  # at most ~4 a second, not one per line


def test_dashboard_overlays_runs_and_reports_failures(corpus: Path) -> None:
    a, b = fake_run(corpus, name="a"), fake_run(corpus, name="b")
    append_jsonl(a.path / "metrics.jsonl", metric(10, 2.0))
    append_jsonl(b.path / "metrics.jsonl", metric(10, 3.0))
    dash = Dashboard([a, b.id], interval=0.05)
    assert [r.id for r in dash.runs] == [a.id, b.id]
    marks = dash.loss_figure.marks
    assert len(marks) == 4 and marks[0].colors != marks[2].colors
    assert [list(m.y) for m in marks[::2]] == [[2.0], [3.0]]
    st = read_json(b.path / "status.json") or {}
    write_json_atomic(b.path / "status.json", {**st, "state": "failed", "error": "rank 1 exited with code 1"})
    until(lambda: "rank 1 exited with code 1" in dash.stats.value)
    assert not dash.views[1].resume.disabled  # a failed run can be resumed
    set_state(a, "stopped")
    until(lambda: not dash.live)
    dash.close()


def test_dashboard_buttons_act_on_the_run(corpus: Path) -> None:
    run = RunStore().create(Spec.from_dict(tiny_spec(corpus)))  # created, never started
    dash = Dashboard(run, interval=0.05)
    dash.views[0].stop.click()
    assert "never started" in dash.message.value
    dash.close()


# -- the runs table -----------------------------------------------------------------------


def test_dashboard_smoothing_log_scale_and_time_axes(corpus: Path) -> None:
    import bqplot as bq
    import numpy as np

    from jupyter_llm.widgets.dashboard import smooth

    run = fake_run(corpus, name="axes")
    t0 = 1_700_000_000.0
    for i, loss in enumerate([4.0, 2.0, 3.0, 1.0]):
        append_jsonl(run.path / "metrics.jsonl", {**metric(10 * (i + 1), loss, t=t0 + 60 * i),
                                                  "mem_peak_mb_ranks": [100.0 + i, 200.0 + i]})  # fmt: skip
    dash = Dashboard(run, interval=0.05)
    view = dash.views[0]
    until(lambda: len(view.loss.x) == 4)
    mem = view.panels["mem_mb"]  # one line per rank, from every rank's peak
    assert np.asarray(mem.y).shape == (2, 4) and list(mem.labels) == ["axes rank 0", "axes rank 1"]
    assert list(np.asarray(mem.y)[1]) == [200.0, 201.0, 202.0, 203.0]
    assert dash.figures["mfu"].layout.display == "none"  # no MFU on CPU: no empty chart
    assert list(view.loss.y) == [4.0, 2.0, 3.0, 1.0]
    dash.smooth_slider.value = 0.5  # TensorBoard's debiased moving average
    assert list(view.loss.y) == pytest.approx(smooth([4.0, 2.0, 3.0, 1.0], 0.5))
    assert view.loss.y[1] == pytest.approx((0.5 * 0.5 * 4 + 0.5 * 2) / (1 - 0.25))
    dash.x_choice.value = "relative"
    assert list(view.loss.x) == [0.0, 1.0, 2.0, 3.0]  # minutes since the first point
    assert dash.loss_figure.axes[0].label == "minutes since the first point"
    dash.x_choice.value = "wall"
    assert view.loss.x[0] == np.datetime64(int(t0 * 1000), "ms")
    assert (
        isinstance(dash.loss_figure.axes[0].scale, bq.DateScale)
        and view.loss.scales["x"] is dash.loss_figure.axes[0].scale
    )
    dash.log_loss.value = True
    assert isinstance(view.loss.scales["y"], bq.LogScale) and isinstance(
        dash.loss_figure.axes[1].scale, bq.LogScale
    )
    dash.x_choice.value, dash.log_loss.value = "step", False
    assert list(view.loss.x) == [10.0, 20.0, 30.0, 40.0] and isinstance(view.loss.scales["y"], bq.LinearScale)
    set_state(run, "completed")
    until(lambda: not dash.live)


def test_dashboard_samples_searchable_log_and_overview(corpus: Path) -> None:
    run = fake_run(corpus, name="pages")
    append_jsonl(run.path / "metrics.jsonl", metric(10, 2.5))
    append_jsonl(
        run.path / "samples.jsonl", {"step": 10, "time": 1.0, "prompt": "ROMEO:", "output": " <b>art</b>"}
    )
    (run.path / "logs").mkdir(exist_ok=True)
    (run.path / "logs" / "rank0.log").write_text("[jupyter-llm] step 10/100: loss=2.5\nsome warning\n")
    dash = Dashboard(run, interval=0.05)
    until(lambda: "ROMEO:" in dash.samples.value)
    assert "&lt;b&gt;art&lt;/b&gt;" in dash.samples.value  # escaped: generated text is never markup
    until(lambda: "some warning" in dash.logs.value)
    dash.log_search.value = "STEP 10"  # case-insensitive: only the matching lines
    assert "step 10/100" in dash.logs.value and "some warning" not in dash.logs.value
    assert "1 of 2 lines" in dash.logs.value
    assert (
        "run id" in dash.overview.value
        and run.id in dash.overview.value
        and "spec (not default)" in dash.overview.value
    )
    set_state(run, "completed")
    until(lambda: not dash.live)


def test_runs_table_lists_runs_and_opens_a_dashboard(corpus: Path) -> None:
    old, new = fake_run(corpus, name="old"), fake_run(corpus, name="new", max_steps=40)
    append_jsonl(new.path / "metrics.jsonl", metric(10, 2.25))
    table = RunsTable(refresh_s=0.1)
    assert list(table.rows) == [new.id, old.id]  # newest first
    row = table.rows[new.id]
    assert (
        row.progress.value == pytest.approx(0.25)
        and "2.2500" in row.loss.value
        and "running" in row.state.value
    )
    row.open.click()
    assert isinstance(table.dashboard, Dashboard) and table.dashboard.runs == [new]
    assert table.detail.children == (table.dashboard,)
    third = fake_run(corpus, name="third")
    until(lambda: next(iter(table.rows)) == third.id)  # the background refresh picks up new runs
    for r in (old, new, third):
        set_state(r, "completed")
    table.close()
