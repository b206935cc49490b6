"""`Playground(run)`: talk to a trained model in the notebook, tokens streamed as they come.

A prompt box (a chat transcript for chat-format runs: the run's chat template applies), the
generation settings (temperature, top-k, top-p, max new tokens, seed), Generate, Stop and
Clear, and one pane per model: `compare=` adds a second checkpoint of the same run or another
run, answering the same prompt side by side. Each pane's model runs in a generator process of
its own (`jupyter_llm.playground.Generator`: started on first use, ended by `close()`, by its
idle timeout, or when the kernel is gone); the kernel never imports torch.
"""

from __future__ import annotations

import html
import threading
import time
from typing import Any

import ipywidgets as w

from ..display import badge
from ..errors import JupyterLLMError
from ..playground import Generator
from ..runs import Run, RunStore

UPDATE_S = 0.05  # at most this often a pane's text is sent to the page while it streams


class Pane(w.VBox):
    """One model: its title, its streamed output (or chat transcript) and its timings."""

    def __init__(self, gen: Generator):
        self.gen = gen
        self.messages: list[dict[str, str]] = []  # chat runs: this pane's conversation
        self.title = w.HTML(f"<b>{html.escape(gen.run.name)}</b> · {html.escape(str(gen.checkpoint))}")
        self.output = w.Textarea(value="", disabled=True, layout=w.Layout(width="100%", height="260px"))
        self.output.add_class("jupyter-llm-playground-output")
        self.stats = w.HTML("<span style='color:var(--jp-ui-font-color2)'>not started</span>")
        self.stats.add_class("jupyter-llm-playground-stats")
        self.busy = False
        super().__init__([self.title, self.output, self.stats], layout=w.Layout(flex="1 1 0", min_width="0"))

    def run_once(self, prompt: str, settings: dict[str, Any], done: Any) -> None:
        """Generate into this pane (in a thread of its own), then call done()."""
        self.busy = True
        chat = self.gen.chat
        if chat:
            self.messages.append({"role": "user", "content": prompt})
            head = self._transcript() + "assistant: "
        else:
            head = ""
            self.output.value = prompt
        text, last, t0 = "", 0.0, time.perf_counter()
        if not self.gen.alive:
            self.stats.value = "starting the generator (loading the model)…"
        try:
            kwargs = {"messages": list(self.messages)} if chat else {"prompt": prompt}
            for msg in self.gen.events(**kwargs, **settings):
                if "text" in msg:
                    text += msg["text"]
                    now = time.perf_counter()
                    if now - last >= UPDATE_S:
                        self.output.value = head + text if chat else prompt + text
                        last = now
                elif msg.get("done"):
                    self.output.value = head + text if chat else prompt + text
                    first = msg.get("first_token_s")
                    self.stats.value = (
                        f"{'stopped · ' if msg.get('stopped') else ''}{msg.get('pieces', 0)} pieces in "
                        f"{msg.get('seconds', 0):.2f} s · first token after {first if first is not None else '–'} s "
                        f"(generator) · {time.perf_counter() - t0:.2f} s here"
                        + (f" · capped at {msg['capped_at']} new tokens: the model's context ends there"
                           if msg.get("capped_at") else "")
                    )  # fmt: skip
            if chat:
                self.messages.append({"role": "assistant", "content": text})
        except JupyterLLMError as e:
            self.stats.value = f"<span style='color:var(--jp-error-color1)'>{html.escape(str(e))}</span>"
        finally:
            self.busy = False
            done()

    def _transcript(self) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in self.messages)

    def clear(self) -> None:
        self.messages = []
        self.output.value = ""
        self.stats.value = ""


class Playground(w.VBox):
    def __init__(
        self,
        run: Run | str,
        checkpoint: int | str = "final",
        compare: Run | str | int | None = None,
        idle_timeout: float = 900.0,
    ):
        self.run = run if isinstance(run, Run) else RunStore().get(run)
        store = RunStore(self.run.path.parent)
        models = [Generator(self.run, checkpoint, idle_timeout)]
        if compare is not None:  # a checkpoint of this run (a step, "latest", "final"), or another run
            if isinstance(compare, int) or str(compare) in ("final", "latest") or str(compare).isdigit():
                models.append(
                    Generator(self.run, compare if isinstance(compare, int) else str(compare), idle_timeout)
                )
            else:
                other = compare if isinstance(compare, Run) else store.get(str(compare))
                models.append(Generator(other, "final", idle_timeout))
        self.panes = [Pane(g) for g in models]
        chat = models[0].chat
        self.prompt = w.Textarea(
            placeholder="message" if chat else "prompt", layout=w.Layout(width="100%", height="70px")
        )
        self.prompt.add_class("jupyter-llm-playground-prompt")
        self.temperature = w.BoundedFloatText(0.8, min=0, max=5, step=0.05, description="temperature")
        self.top_k = w.BoundedIntText(0, min=0, max=100_000, description="top-k", tooltip="0: off")
        self.top_p = w.BoundedFloatText(
            1.0, min=0.01, max=1.0, step=0.05, description="top-p", tooltip="1: off"
        )
        self.max_new_tokens = w.BoundedIntText(64, min=1, max=4096, description="max new")
        self.seed = w.BoundedIntText(0, min=0, max=2**32 - 1, description="seed")
        for box in (self.temperature, self.top_k, self.top_p, self.max_new_tokens, self.seed):
            box.layout = w.Layout(width="170px")
            box.style = {"description_width": "80px"}
        self.generate_button = w.Button(
            description="Send" if chat else "Generate", button_style="primary", icon="play"
        )
        self.stop_button = w.Button(description="Stop", icon="stop", disabled=True)
        self.clear_button = w.Button(description="Clear", icon="eraser")
        self.close_button = w.Button(description="Close", icon="times", tooltip="end the generator processes")
        self.close_button.add_class("jupyter-llm-playground-close")
        self.close_button.on_click(lambda _: self.close())
        self.generate_button.add_class("jupyter-llm-playground-generate")
        self.stop_button.add_class("jupyter-llm-playground-stop")
        self.generate_button.on_click(lambda _: self.generate())
        self.stop_button.on_click(lambda _: self.stop())
        self.clear_button.on_click(lambda _: self.clear())
        head = w.HTML(f"<b>Playground</b> · {html.escape(self.run.id)} {badge(self.run.state)}"
                      + (" · chat (the run's chat template)" if chat else ""))  # fmt: skip
        settings = w.HBox([self.temperature, self.top_k, self.top_p, self.max_new_tokens, self.seed],
                          layout=w.Layout(flex_flow="row wrap"))  # fmt: skip
        buttons = w.HBox([self.generate_button, self.stop_button, self.clear_button, self.close_button])
        super().__init__(
            [head, self.prompt, settings, buttons, w.HBox(self.panes, layout=w.Layout(width="100%"))]
        )
        self.add_class("jupyter-llm-playground")
        self._threads: list[threading.Thread] = []
        self._left = 0
        self._lock = threading.Lock()

    def settings(self) -> dict[str, Any]:
        return {"temperature": float(self.temperature.value), "top_k": int(self.top_k.value) or None,
                "top_p": float(self.top_p.value) if self.top_p.value < 1 else None,
                "max_new_tokens": int(self.max_new_tokens.value), "seed": int(self.seed.value)}  # fmt: skip

    def generate(self, prompt: str | None = None, wait: bool = False) -> None:
        """Every pane answers `prompt` (default: the prompt box), streaming; returns at once."""
        if any(p.busy for p in self.panes):
            return
        text = self.prompt.value if prompt is None else prompt
        if self.panes[0].gen.chat:
            self.prompt.value = ""
        self.generate_button.disabled, self.stop_button.disabled = True, False
        self._left = len(self.panes)
        settings = self.settings()
        self._threads = [threading.Thread(target=p.run_once, args=(text, settings, self._one_done), daemon=True)
                         for p in self.panes]  # fmt: skip
        for t in self._threads:
            t.start()
        if wait:
            for t in self._threads:
                t.join()

    def _one_done(self) -> None:
        with self._lock:
            self._left -= 1
            if self._left == 0:
                self.generate_button.disabled, self.stop_button.disabled = False, True

    def stop(self) -> None:
        for p in self.panes:
            p.gen.stop()

    def clear(self) -> None:
        for p in self.panes:
            p.clear()

    def text(self) -> list[str]:
        return [p.output.value for p in self.panes]

    def close(self) -> None:
        """End the generator processes, then the widget."""
        self.stop()
        for t in self._threads:
            t.join(10)
        for p in self.panes:
            p.gen.close()
        super().close()

    @property
    def pids(self) -> list[int]:
        return [p.gen.pid for p in self.panes if p.gen.alive and p.gen.pid is not None]
