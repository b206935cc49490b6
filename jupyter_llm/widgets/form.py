"""`SpecForm()`: a form generated from the Spec's schema, validated on every change.

Each Spec field becomes a widget chosen from its type (dropdowns for choices, a log slider
for the learning rate, spin boxes for integers, YAML text for the rest), grouped by section.
Beside the form: the problems (also next to their fields), the DeepSpeed config, the launch
command and the memory per ZeRO stage (DeepSpeed's estimators in a subprocess, off the kernel's
thread). Launch, Dry run and "Copy as cell" act on the validated Spec through the Python API.
"""

from __future__ import annotations

import html
import json
import math
import threading
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import ipywidgets as w
import yaml
from pydantic import BaseModel

from ..display import TEXT
from ..errors import SpecError, UserError
from ..runs import Run, RunStore
from ..spec import Spec, field_help

SECTIONS = ["model", "tokenizer", "data", "train", "optim", "distributed"]
LOG_SLIDERS = {"optim.lr": (-6.0, 0.0)}  # exponent range of a log-scale slider
NONE_LABEL = "(none)"
ERROR_STYLE = f"color:{TEXT['error']};font-size:85%"
_FORMAT = "data.format"
# fields that mean something only for some choices: shown when their rule holds for the form's
# current values (and always while they hold a problem); hidden fields keep their values
APPLIES: dict[str, Any] = {
    "data.text_field": lambda v: v.get(_FORMAT) == "text",
    "data.prompt_field": lambda v: v.get(_FORMAT) == "pairs",
    "data.response_field": lambda v: v.get(_FORMAT) == "pairs",
    "data.messages_field": lambda v: v.get(_FORMAT) == "chat",
    "tokenizer.chat_template": lambda v: v.get(_FORMAT) == "chat",
    "data.mlm_probability": lambda v: v.get("model.task") == "masked-lm",
    "data.val_fraction": lambda v: not v.get("data.validation"),
    "optim.momentum": lambda v: v.get("optim.name") == "sgd",
    "optim.betas": lambda v: v.get("optim.name") != "sgd",
    "optim.eps": lambda v: v.get("optim.name") != "sgd",
    "optim.min_lr": lambda v: v.get("optim.scheduler") == "cosine",
    "distributed.nvme_path": lambda v: v.get("distributed.offload") in ("nvme", "auto"),
}


@dataclass
class _Field:
    key: str  # dotted spec key
    widget: w.Widget
    error: w.HTML
    kind: str  # "value" (widget holds the value), "text" (a string), "yaml" (YAML text), "lines"
    optional: bool
    empty: Any = None  # the value of an empty text field when the field is not optional
    view: Any = None  # what the form shows (the widget itself, or a group around it)
    row: Any = None  # the view and its problem, one line of the form

    def get(self) -> Any:
        v = self.widget.value
        if self.kind == "value":
            return None if v == NONE_LABEL else v
        text = str(v)
        if self.kind == "lines":
            items = [ln.strip() for ln in text.splitlines() if ln.strip()]
            return items or (None if self.optional else [])
        if not text.strip():
            return None if self.optional else self.empty
        if self.kind == "text":
            return text
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"not valid YAML: {getattr(e, 'problem', e)}") from None

    def set(self, value: Any) -> None:
        if self.kind == "value":
            self.widget.value = NONE_LABEL if value is None else value
        elif self.kind == "lines":
            self.widget.value = "\n".join(value or [])
        elif self.kind == "text":
            self.widget.value = "" if value is None else str(value)
        else:
            self.widget.value = "" if value is None else _yaml(value)


def _yaml(value: Any) -> str:
    if isinstance(value, list | tuple) and all(not isinstance(v, dict | list) for v in value):
        return json.dumps(list(value))  # [0.9, 0.99] on one line
    if isinstance(value, dict):
        return yaml.safe_dump(value, sort_keys=False).strip() if value else ""
    return yaml.safe_dump(value).strip().removesuffix("...").strip()


def _range_text(info: Any) -> str:
    """'> 0 and ≤ 10' from a field's bounds, '' when it has none."""
    marks = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    found = [f"{sign} {getattr(m, k):g}" for m in info.metadata for k, sign in marks.items()
             if isinstance(getattr(m, k, None), int | float)]  # fmt: skip
    return " and ".join(found)


def _unwrap_optional(ann: Any) -> tuple[Any, bool]:
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) < len(typing.get_args(ann)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True  # noqa: UP007
    return ann, False


def _is_section(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _make_field(key: str, info: Any, help_text: str) -> _Field:
    ann, optional = _unwrap_optional(info.annotation)
    label = key.rsplit(".", 1)[-1]
    tip = _tooltip(help_text, info)
    desc = {"description": label, "tooltip": tip, "style": {"description_width": "150px"},
            "layout": w.Layout(width="100%", max_width="420px")}  # fmt: skip
    view = None
    error = w.HTML(layout=w.Layout(margin="0 0 0 8px"))
    if typing.get_origin(ann) is Literal:
        options = list(typing.get_args(ann)) + ([NONE_LABEL] if optional else [])
        widget: w.Widget = w.Dropdown(options=options, **desc)
        kind = "value"
    elif ann is bool and not optional:
        widget, kind = w.Checkbox(indent=True, **desc), "value"
    elif key in LOG_SLIDERS:  # a log slider to sweep decades, beside the exact value
        a, b = LOG_SLIDERS[key]
        widget = w.FloatText(tooltip=tip, layout=w.Layout(width="110px", flex="0 0 auto"))
        slider = w.FloatLogSlider(base=10, min=a, max=b, step=0.01, readout=False, description=label,
                                  tooltip=tip, style=desc["style"], layout=w.Layout(flex="1 1 auto", min_width="0"))  # fmt: skip
        _link_log_slider(slider, widget)
        view = w.HBox([slider, widget], layout=w.Layout(width="100%", max_width="420px"))
        kind = "value"
    elif ann is int and not optional:  # not a Bounded box: it would clamp -5 to 1 without a word
        widget, kind = w.IntText(**desc), "value"
    elif ann is float and not optional:
        widget, kind = w.FloatText(**desc), "value"
    elif typing.get_origin(ann) is list and typing.get_args(ann) == (str,):
        widget = w.Textarea(placeholder="one file or glob per line", rows=2, **desc)
        kind = "lines"
    elif typing.get_origin(ann) is dict or _is_section(ann):
        widget = w.Textarea(
            placeholder="YAML mapping" + (" (empty: none)" if optional else ""), rows=3, **desc
        )
        kind = "yaml"
    else:
        widget = w.Text(placeholder="(none)" if optional else "", **desc)
        kind = "text" if ann is str else "yaml"
    empty: Any = {} if typing.get_origin(ann) is dict else "" if ann is str else None
    widget.add_class("jupyter-llm-field-" + key.replace(".", "-"))  # a stable handle for browser tests
    return _Field(key, widget, error, kind, optional, empty, view or widget)


def _tooltip(help_text: str, info: Any) -> str:
    """The field's help: its meaning from the spec's source, its bounds, its default."""
    parts = [help_text[:1].upper() + help_text[1:].rstrip(".") + "." if help_text else ""]
    if bounds := _range_text(info):
        parts.append(f"Allowed: {bounds}.")
    if not info.is_required():
        default = info.get_default(call_default_factory=True)
        if not isinstance(default, BaseModel):
            parts.append(f"Default: {'none' if default is None else _yaml(default)}.")
    return " ".join(p for p in parts if p) or "(no help written for this field)"


def _link_log_slider(slider: w.FloatLogSlider, box: w.FloatText) -> None:
    """Slider moves set a rounded value in the box; a typed value is kept exactly."""
    busy = [False]

    def follow(src: w.Widget, dst: w.Widget, fn: Any) -> None:
        def on_change(change: Any) -> None:
            if not busy[0]:
                busy[0] = True
                try:
                    dst.value = fn(change["new"])
                finally:
                    busy[0] = False

        src.observe(on_change, names="value")

    def rounded(v: float) -> float:
        # the browser snaps the slider to its step and echoes that back: a value within half a
        # step of the typed one is that echo, and the typed value stands
        if box.value > 0 and v > 0 and abs(math.log10(v) - math.log10(box.value)) <= slider.step / 2:
            return float(box.value)
        return float(f"{v:.3g}")

    follow(slider, box, rounded)
    follow(box, slider, lambda v: v)


def _walk(model: type[BaseModel], prefix: str) -> list[_Field]:
    fields = []
    for name, info in model.model_fields.items():
        ann, optional = _unwrap_optional(info.annotation)
        key = f"{prefix}{name}"
        if _is_section(ann) and not optional:  # nested section (data.clean): its own fields
            fields += _walk(ann, key + ".")
        else:
            fields.append(_make_field(key, info, field_help(model).get(name, "")))
    return fields


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _flatten(data: Mapping[str, Any], keys: set[str], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if key in keys:
            out[key] = v
        elif isinstance(v, Mapping):
            out.update(_flatten(v, keys, key + "."))
    return out


def _initial(spec_or_run: Spec | Run | str | Mapping[str, Any] | None) -> dict[str, Any]:
    if spec_or_run is None:
        return {}
    if isinstance(spec_or_run, Spec):
        return spec_or_run.to_dict()
    if isinstance(spec_or_run, Run):
        return spec_or_run.spec.to_dict()
    if isinstance(spec_or_run, Mapping):
        return dict(spec_or_run)
    return RunStore().get(spec_or_run).spec.to_dict()  # a run id, prefix or name


class SpecForm(w.VBox):
    """`SpecForm()`, `SpecForm(spec)`, `SpecForm(run)` (clones its spec for tweaking)."""

    def __init__(self, spec_or_run: Spec | Run | str | Mapping[str, Any] | None = None,
                 estimate_memory: bool = True):  # fmt: skip
        self.fields: dict[str, _Field] = {}
        groups: dict[str, list[_Field]] = {"run": []}
        for name, info in Spec.model_fields.items():
            ann, _ = _unwrap_optional(info.annotation)
            if name in SECTIONS and _is_section(ann):
                groups[name] = _walk(ann, name + ".")
            else:  # name, seed, and the raw deepspeed mapping
                field = _make_field(name, info, field_help(Spec).get(name, ""))
                groups["distributed" if name == "deepspeed" else "run"].append(field)
        for fs in groups.values():
            for f in fs:
                self.fields[f.key] = f
        # defaults for a new spec, then the given spec over them
        defaults = {"data.train": [], **{k: _default(k) for k in self.fields if k != "data.train"}}
        start = {**defaults, **_flatten(_initial(spec_or_run), set(self.fields))}
        for key, f in self.fields.items():
            f.set(start.get(key))

        for f in self.fields.values():
            f.row = w.HBox([f.view, f.error], layout=w.Layout(flex_flow="row wrap", align_items="center"))
        accordion = w.Accordion(children=[w.VBox([f.row for f in groups[g]]) for g in groups])
        for i, g in enumerate(groups):
            accordion.set_title(i, g)
        accordion.selected_index = list(groups).index("optim")
        self.status = w.HTML()
        self.ds_config = w.HTML()
        self.command = w.HTML()
        self.memory = w.HTML("<i>memory estimate: waiting for a valid spec</i>")
        side = w.Accordion(children=[self.ds_config, self.command, self.memory])
        for i, t in enumerate(["DeepSpeed config", "launch command", "memory per ZeRO stage"]):
            side.set_title(i, t)
        side.selected_index = 1
        self.launch_button = w.Button(description="Launch", button_style="primary", icon="rocket")
        self.dry_button = w.Button(description="Dry run", icon="check")
        self.cell_button = w.Button(description="Copy as cell", icon="copy")
        self.launch_button.on_click(lambda _: self.launch())
        self.dry_button.on_click(lambda _: self._show_dry_run())
        self.cell_button.on_click(lambda _: self._show_cell())
        self.output = w.Output()
        self.run: Run | None = None  # the last run launched from the form
        self._estimate_memory = estimate_memory
        self._memory_key: str | None = None
        self._memory_lock = threading.Lock()
        self.spec: Spec | None = None
        self.problems: list[tuple[str, str, str]] = []
        # the fields scroll inside their column, so the problems and the side panel beside them
        # and the buttons below stay in view however long a section is
        # side by side where there is room, one above the other in a narrow notebook
        right = w.VBox([self.status, side], layout=w.Layout(flex="1 1 300px", min_width="0", margin="0 0 0 12px",
                                                            max_height="70vh", overflow="hidden auto"))  # fmt: skip
        left = w.VBox([accordion], layout=w.Layout(flex="1 1 380px", min_width="0", max_height="70vh",
                                                   overflow="hidden auto"))  # fmt: skip
        self.summary = w.HTML()  # the problem count again, beside the buttons
        super().__init__([
            w.HBox([left, right], layout=w.Layout(flex_flow="row wrap")),
            w.HBox([self.launch_button, self.dry_button, self.cell_button, self.summary],
                   layout=w.Layout(flex_flow="row wrap")),
            self.output,
        ])  # fmt: skip
        self.add_class("jupyter-llm-specform")
        for f in self.fields.values():
            f.widget.observe(lambda _change: self.validate(), names="value")
        self.validate()

    # -- values ---------------------------------------------------------------------------

    @property
    def value(self) -> dict[str, Any]:
        """The spec mapping the fields give (unvalidated; a field with bad YAML is left out)."""
        flat = {}
        for key, f in self.fields.items():
            try:
                v = f.get()
            except ValueError:
                continue
            if v is not None or f.optional:
                flat[key] = v
        return _nest(flat)

    def _current(self) -> dict[str, Any]:
        out = {}
        for key, f in self.fields.items():
            try:
                out[key] = f.get()
            except ValueError:
                out[key] = None
        return out

    def shown(self, key: str) -> bool:
        """Whether the form shows a field now (fields that do not apply are hidden)."""
        return self.fields[key].row.layout.display != "none"

    def set(self, key: str, value: Any) -> None:
        """Set a field by its dotted key (as if typed in), e.g. form.set("optim.lr", 3e-4)."""
        if key not in self.fields:
            raise KeyError(f"no field {key!r}; fields: {', '.join(self.fields)}")
        self.fields[key].set(value)

    def validate(self) -> Spec | None:
        """Validate the fields; show problems beside them and refresh the side panel."""
        problems: list[tuple[str, str, str]] = []
        for f in self.fields.values():
            try:
                f.get()
            except ValueError as e:
                problems.append((f.key, str(f.widget.value)[:40], str(e)))
        spec = None
        if not problems:
            try:
                spec = Spec.from_dict(self.value)
            except SpecError as e:
                problems = e.table()
        self.spec, self.problems = spec, problems
        by_field: dict[str, list[str]] = {}
        for key, _given, msg in problems:
            owner = next((k for k in sorted(self.fields, key=len, reverse=True)
                          if key == k or key.startswith(k + ".")), None)  # fmt: skip
            by_field.setdefault(owner or "", []).append(msg if owner == key else f"{key}: {msg}")
        current = self._current()
        for key, f in self.fields.items():
            msgs = by_field.get(key, [])
            f.error.value = (
                f'<span style="{ERROR_STYLE}">{html.escape("; ".join(msgs))}</span>' if msgs else ""
            )
            rule = APPLIES.get(key)
            f.row.layout.display = "none" if rule and not msgs and not rule(current) else None
        for b in (self.launch_button, self.dry_button, self.cell_button):
            b.disabled = spec is None
        if spec is None:
            rows = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(m)}</li>" for k, _, m in problems)
            self.status.value = (
                f'<div style="color:{TEXT["error"]}">{len(problems)} problem(s)<ul>{rows}</ul></div>'
            )
            self.summary.value = (
                f'<span style="{ERROR_STYLE}">{len(problems)} problem(s): fix them to launch</span>'
            )
            return None
        self.status.value = f'<div style="color:{TEXT["ok"]}">✔ valid spec</div>'
        self.summary.value = ""
        self._side_panel(spec)
        return spec

    def _side_panel(self, spec: Spec) -> None:
        from ..preflight import dry_run

        try:
            d = dry_run(spec, estimate_memory=False, probe=False)  # no ssh round trips per keystroke
        except UserError as e:  # e.g. distributed.nodes names no cluster of clusters.yaml
            self.command.value = f'<div style="{ERROR_STYLE}">{html.escape(str(e))}</div>'
            return
        self.ds_config.value = f"<pre>{html.escape(json.dumps(d.ds_config, indent=2), quote=False)}</pre>"
        layout = next((c for c in d.checks if c.name == "tensor parallel"), None)  # DP x TP, or why not
        ranks = f"{d.ranks} rank(s)" if layout is None else html.escape(layout.detail)
        self.command.value = (f"<pre style='white-space:pre-wrap'>{html.escape(' '.join(d.command))}</pre>"
                              f"<div>{ranks}</div>")  # fmt: skip
        if self._estimate_memory:
            dd = spec.distributed
            key = json.dumps([spec.model.model_dump(mode="json"), d.ranks, dd.offload, dd.zero_stage, dd.nvme_path,
                              spec.train.micro_batch_size, spec.data.block_size, spec.train.precision])  # fmt: skip
            if key != self._memory_key:
                self._memory_key = key
                self.memory.value = "<i>estimating…</i>"
                threading.Thread(target=self._estimate, args=(spec, d.ranks, key), daemon=True).start()

    def _estimate(self, spec: Spec, ranks: int, key: str) -> None:
        from ..display import fit_html, memory_html
        from ..preflight import memory_estimate

        with self._memory_lock:  # one estimate at a time; a stale one is dropped
            if key != self._memory_key:
                return
            memory, err = memory_estimate(spec, ranks)
            plan = None
            if memory and "shape" in memory and spec.distributed.nodes == 1:  # this machine's resources
                from .. import fit

                plan = fit.plan_spec(
                    spec, memory["shape"], ranks, ranks, fit.probe(spec.distributed.nvme_path)
                )
        if key == self._memory_key:
            self.memory.value = memory_html(memory, err) + ("" if plan is None else fit_html(plan))

    # -- actions --------------------------------------------------------------------------

    def cell_text(self) -> str:
        """The `%%llm_train` cell that launches this spec."""
        spec = self._require()
        # only what differs from the defaults: a readable cell that gives the same Spec
        body = {k: v for k, v in spec.model_dump(mode="json", exclude_defaults=True).items() if k != "name"}
        return f"%%llm_train {spec.name}\n" + yaml.safe_dump(body, sort_keys=False)

    def launch(self) -> Run:
        """Start the spec as a detached run and show its dashboard below the form."""
        from ..runs import launch
        from .dashboard import Dashboard

        self.run = launch(self._require())
        self.output.clear_output()
        with self.output:
            from IPython.display import display

            display(Dashboard(self.run))
        return self.run

    def _require(self) -> Spec:
        spec = self.validate()
        if spec is None:
            raise SpecError([])  # pragma: no cover - buttons are disabled while invalid
        return spec

    def _show_dry_run(self) -> None:
        from IPython.display import display

        from ..preflight import dry_run

        self.output.clear_output()
        with self.output:
            display(dry_run(self._require()))

    def _show_cell(self) -> None:
        from IPython.display import display

        text = self.cell_text()
        self.output.clear_output()
        with self.output:
            display(w.HTML("<b>the equivalent cell</b> (select, copy, paste into a new cell):"))
            display(w.Textarea(value=text, rows=min(30, text.count("\n") + 1), layout=w.Layout(width="100%")))


def _default(key: str) -> Any:
    model: Any = Spec
    *parents, leaf = key.split(".")
    for p in parents:
        ann, _ = _unwrap_optional(model.model_fields[p].annotation)
        model = ann
    info = model.model_fields[leaf]
    value = info.get_default(call_default_factory=True)
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value
