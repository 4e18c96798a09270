# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mlpl-installed
# KenLM's estimator (lmplz) for the labeling LMs, built from the kenlm source distribution on PyPI with cmake and
# Boost from Debian's packages; order 6 is the most flashlight-text's bundled KenLM loads.
KENLM_VERSION := 0.2.0
KENLM_DIR     := build/kenlm
LMPLZ         := $(KENLM_DIR)/bin/lmplz
BOOST_PKGS    := libboost-program-options-dev libboost-system-dev libboost-thread-dev libboost-test-dev zlib1g-dev
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install demo test test-fast lint bench faults gpu-check reproduce datasize levers ablations capacity serving serving-student server serve screenshot clean

$(STAMP): pyproject.toml $(LMPLZ)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

$(LMPLZ):
	@test -f /usr/include/boost/program_options.hpp || (command -v apt-get >/dev/null && \
		(apt-get install -y -qq --no-install-recommends $(BOOST_PKGS) >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq --no-install-recommends $(BOOST_PKGS) >/dev/null))) || \
		(echo "lmplz needs cmake, a C++ compiler and Boost: apt-get install cmake g++ $(BOOST_PKGS)" >&2; exit 1)
	@mkdir -p $(KENLM_DIR)/src
	@test -f $(KENLM_DIR)/kenlm.tar.gz || $(PYTHON) -c "import re, urllib.request as u; \
		page = u.urlopen('https://pypi.org/simple/kenlm/', timeout=60).read().decode(); \
		u.urlretrieve(re.search(r'href=\"([^\"#]*/kenlm-$(KENLM_VERSION)\.tar\.gz)', page)[1], '$(KENLM_DIR)/kenlm.tar.gz')"
	tar xzf $(KENLM_DIR)/kenlm.tar.gz -C $(KENLM_DIR)/src --strip-components=1
	cmake -S $(KENLM_DIR)/src -B $(KENLM_DIR)/cmake -DCMAKE_BUILD_TYPE=Release -DKENLM_MAX_ORDER=6 >/dev/null
	cmake --build $(KENLM_DIR)/cmake --target lmplz build_binary -j2 >$(KENLM_DIR)/build.log 2>&1
	@mkdir -p $(KENLM_DIR)/bin && cp $(KENLM_DIR)/cmake/bin/lmplz $(KENLM_DIR)/cmake/bin/build_binary $(KENLM_DIR)/bin/

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mlpl demo --corpus demo --corpus-dir data/demo --run-dir runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/mlpl bench --corpus demo --corpus-dir data/demo

# The CUDA path on one GPU (device tests, peak, labeling and training throughput) → docs/gpu-check.{json,md};
# without a GPU it says so and runs the CPU parts.
gpu-check: $(STAMP)
	$(BIN)/python -m pipeline.studies.gpu_check docs

# Faults an operator meets, injected at random points through the real components (issue 33; ≤ 20 min on 2
# cores, smoke corpus): each trial N times, a clean rerun, compared with an uninterrupted run; the table goes to
# docs/benchmarks.md ("Fault trials"). Exits 1 when a trial did not recover.
faults: $(STAMP)
	@mkdir -p runs/faults
	bash -o pipefail -c '$(BIN)/mlpl faults --corpus smoke --corpus-dir data/smoke --out runs/faults \
		--results docs/benchmarks.md --results-command "make faults" 2>&1 | tee runs/faults/faults.log'

# The whole recipe on the bench corpus (six languages, LM-fused labeling, the paper's three students, the
# same-compute control); writes docs/results.md (1 h 57 min on a 2-core AVX-512 EPYC from a fresh machine; a
# rerun resumes where it stopped; the log is runs/bench/reproduce.log).
reproduce: $(STAMP)
	@mkdir -p runs/bench
	bash -o pipefail -c '$(BIN)/mlpl recipe --corpus bench --corpus-dir data/bench --run-dir runs/bench \
		--recipe bench --results docs/results.md --results-command "make reproduce" 2>&1 | tee -a runs/bench/reproduce.log'

# Does more PL audio pay? From-scratch students at 1x, 3x and 10x a high-resource language's labeled hours of PLs
# (make reproduce's own student has all of them, about 30x) and the base's budget at N/2 (and at 4 N when 2 N still
# gains), branched off make reproduce's finished run (run that first);
# `make levers`: the same student with the natural PL share, twice its budget (against a control as long), greedy
# PLs, and the larger student with twice its budget (≈ 2 h alone). Both write docs/results.md ("Does more PL audio
# pay?") after each part (every student before any control).
datasize levers: $(STAMP)
	@test -f runs/bench/report/report.json || (echo "runs/bench has no finished recipe: run make reproduce first" >&2; exit 2)
	@mkdir -p runs/bench-datasize
	bash -o pipefail -c '$(BIN)/mlpl datasize --corpus-dir data/bench --run-dir runs/bench --out runs/bench-datasize \
		$(if $(filter levers,$@),--levers) --results docs/results.md --results-command "make $@" 2>&1 \
		| tee -a runs/bench-datasize/$@.log'

# Each lever of the recipe switched, one run each, branched off `make reproduce`'s finished run (only what a
# lever touches trains again; ≈ 2 h on the AVX-512 Xeon); the table goes into docs/results.md ("Ablations").
ablations: $(STAMP)
	@mkdir -p runs/bench-ablations
	bash -o pipefail -c '$(BIN)/mlpl ablate --corpus bench --corpus-dir data/bench --run-dir runs/bench --recipe bench \
		--out runs/bench-ablations --results docs/results.md --results-command "make ablations" 2>&1 \
		| tee -a runs/bench-ablations/ablations.log'

# Li et al. 2021's capacity study on the bench corpus: depth vs width, transformer vs Conformer, language
# conditioning, one model per language vs one multilingual model, each the same training time (≈ 1 h on the
# AVX-512 Xeon); the tables go into docs/results.md ("Capacity study").
capacity: $(STAMP)
	@mkdir -p runs/bench-capacity
	bash -o pipefail -c '$(BIN)/mlpl capacity --corpus-dir data/bench --out runs/bench-capacity \
		--results docs/results.md --results-command "make capacity" 2>&1 | tee -a runs/bench-capacity/capacity.log'

# Serving-size students (issue 20) on the bench corpus: dense vs language-agnostic vs pathways pruning (IMP, LTH)
# at 70.6 % sparsity, float vs 8/4/2/1-bit QAT, from the tiny supervised model (trained first); tables into
# docs/results.md ("Serving-size students").
serving: $(STAMP)
	@mkdir -p runs/bench-serving
	bash -o pipefail -c '$(BIN)/mlpl serving --corpus-dir data/bench --out runs/bench-serving \
		--results docs/results.md --results-command "make serving" 2>&1 | tee -a runs/bench-serving/serving.log'

# The same study on the best student of `make reproduce` (fine-tuned, then labeled-only fine-tuned; run that first):
# the model a user would deploy (≈ 18 min on the AVX-512 Xeon); docs/results.md ("Serving-size students: the final
# student").
BEST_STUDENT := runs/bench/student/finetune-labeled-ft/checkpoints/best.pt
serving-student: $(STAMP)
	@test -f $(BEST_STUDENT) || (echo "$(BEST_STUDENT) is missing: run make reproduce first" >&2; exit 2)
	@mkdir -p runs/bench-serving-student
	bash -o pipefail -c '$(BIN)/mlpl serving --corpus-dir data/bench --init $(BEST_STUDENT) \
		--out runs/bench-serving-student --results docs/results.md --section "Serving-size students: the final student" \
		--results-command "make serving-student" 2>&1 | tee -a runs/bench-serving-student/serving.log'

# Operators: a local Prefect server (SQLite under ~/.prefect) and every flow served against it; UI on PREFECT_PORT.
PREFECT_PORT ?= 4200
server: $(STAMP)
	PREFECT_UI_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

serve: $(STAMP)
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/mlpl serve --recipe demo

# docs/prefect_ui.png: the server test photographs its completed recipe run with headless Chromium (Debian's).
screenshot: $(STAMP)
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	MLPL_SCREENSHOT=docs/prefect_ui.png $(BIN)/python -m pytest -q tests/flows/test_prefect_server.py

clean:
	rm -rf runs data/demo data/bench .pytest_cache
