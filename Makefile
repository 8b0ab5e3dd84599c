# octn4: two commands on a fresh machine.
#   make demo   generate a stack with a known bias, correct it, say where the results are
#   make test   run the test suite
# Both create .venv and install octn4 with the pinned versions in constraints.txt.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO   ?= demo

.PHONY: demo test venv browser java lock images clean

# The report test drives a real headless browser (Debian's chromium + chromedriver).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

demo: venv
	$(VENV)/bin/octn4 synth $(DEMO)/data --shape 96,192,192 --sections 4 --seed 1 --overwrite
	$(VENV)/bin/octn4 run $(DEMO)/data/volume.ome.zarr $(DEMO)/results --sections 4 --workers 2 --overwrite
	@echo
	@echo "Demo done. Input and its ground truth: $(DEMO)/data/"
	@echo "Results (corrected, bias, mask, fields.json, metrics.json): $(DEMO)/results/"
	@echo "QC report (open in a browser): $(DEMO)/results/report/report.html"

browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  echo "installing Debian's chromium and chromium-driver for the QC report's browser test"; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

# The offline Nextflow checks run Nextflow's language server (Java 17+).
java:
	@command -v java >/dev/null || { \
	  echo "installing Debian's default-jre-headless for the Nextflow checks"; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q default-jre-headless; }

test: venv browser java
	$(PY) -m pytest -q

# Re-pin constraints.txt from a clean resolve of pyproject.toml's ranges; the GPU extra
# (CuPy and NVIDIA's CUDA wheels, for the CUDA image) is resolved without installing it.
lock:
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv
	.lockenv/bin/pip install --quiet '.[test]'
	.lockenv/bin/pip freeze --exclude octn4 > constraints.txt
	.lockenv/bin/python containers/pin_gpu.py constraints.txt
	rm -rf .lockenv

# Build and tag the CPU and CUDA images (and Apptainer twins where apptainer exists).
images:
	bash containers/build.sh

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .cache
