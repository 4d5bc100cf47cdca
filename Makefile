# The two commands of README.md:
#   make run    set up everything and start the hub on http://127.0.0.1:8000
#   make test   set up everything and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
CHP_VERSION ?= 5
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: run test bench gpu-check system system-test engine testbed reference clean

run: system $(VENV)/.installed $(VENV)/bin/configurable-http-proxy engine
	@image=$$(PYTHON=$(PY) docker/singleuser/build.sh gpuspawner/singleuser jupyterlab) && \
	data=$${GPUSPAWNER_DATA_DIR:-.data} && auth=$${GPUSPAWNER_AUTH:-shared-password} && \
	url=http://$${GPUSPAWNER_IP:-127.0.0.1}:$${GPUSPAWNER_PORT:-8000} && \
	if [ "$$auth" = shared-password ]; then \
	    login="password: $$data/user-password (one password, any name: a demo on this machine only; GPUSPAWNER_AUTH=native for accounts of their own)"; \
	else login="login: sign up at $$url/hub/signup, admins ($${GPUSPAWNER_ADMIN_USERS:-none set}) authorise at $$url/hub/authorize"; fi && \
	echo "hub: $$url  image: $$image  $$login" && \
	GPUSPAWNER_AUTH=$$auth GPUSPAWNER_IMAGE=$${GPUSPAWNER_IMAGE:-$$image} $(VENV)/bin/jupyterhub -f jupyterhub_config.py

test: system-test $(VENV)/.installed $(VENV)/bin/configurable-http-proxy testbed
	$(PY) -m pytest $(PYTEST_ARGS)

# Spawn performance against DockerSpawner (about 12 minutes on 2 CPUs); rewrites the README's results table.
bench: system-test $(VENV)/.installed $(VENV)/bin/configurable-http-proxy testbed
	$(PY) benchmarks/spawn.py --update-readme $(BENCH_ARGS)

# On a host with NVIDIA's driver: gpuspawner against the real GPUs (tests/test_real_gpu.py), ending in a
# summary to paste. Fails where no driver answers; PyTorch, Docker and the NVIDIA Container Toolkit are
# used where present (GPUSPAWNER_TORCH_PYTHON, GPUSPAWNER_GPU_CHECK_IMAGE: see the test's docstring).
gpu-check: $(VENV)/.installed
	GPUSPAWNER_REQUIRE_GPU=1 $(PY) -m pytest tests/test_real_gpu.py -s -v -rs $(PYTEST_ARGS)

system:
	docker/host/system-deps.sh run

system-test:
	docker/host/system-deps.sh test

# A Docker engine for the hub (a plain dockerd is started as root if none answers).
engine:
	tests/testbed/testbed.sh engine

# The test bed's engine: dockerd with the stand-in nvidia-container-runtime-hook if none answers.
testbed:
	tests/testbed/testbed.sh start

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(VENV)/bin/configurable-http-proxy:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	npm install --global --silent --prefix $(VENV) configurable-http-proxy@$(CHP_VERSION)

# Regenerate the README's configuration reference from the traits' help texts, and its
# tampering table from what `gpuspawner audit verify` answers to each attack.
reference: $(VENV)/.installed
	$(VENV)/bin/gpuspawner config-reference --update README.md
	GPUSPAWNER_UPDATE_README=1 $(PY) -m pytest -q tests/test_tampering.py

clean:
	rm -rf $(VENV) *.egg-info
