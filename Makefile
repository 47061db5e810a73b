# llm-deployment: `make up` and `make test` are all a fresh machine needs.
PROFILE ?= demo
# Several hosts (docs/multi-host.md): ROLE=head on one, ROLE=worker CONTROLLER=http://HEAD:21001
# MODELS=a,b on the others. MODELS= (empty) on a head: no local workers. WORKER_HOST= and
# ADVERTISE_HOST= set this host's worker addresses, so that all hosts can share one conf/.
ROLE    ?= all
CONTROLLER ?=
WORKER_HOST ?=
ADVERTISE_HOST ?=
CONF    ?= conf
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
DEPLOY  := $(PY) -m deploy --conf $(CONF)
STAMP   := $(VENV)/.installed
# Where the CPU build of torch comes from. Empty: pip's own configuration (here a local wheel).
# Elsewhere: make up TORCH_INDEX=https://download.pytorch.org/whl/cpu (else pip takes CUDA's).
TORCH_INDEX ?=

.PHONY: up down status logs drain test install clean

up: $(STAMP)           ## prepare the profile's models, start or update the stack, wait until it serves
	$(DEPLOY) up --profile $(PROFILE) --role $(ROLE) $(if $(CONTROLLER),--controller $(CONTROLLER)) \
	  $(if $(filter undefined,$(origin MODELS)),,--models "$(MODELS)") \
	  $(if $(WORKER_HOST),--worker-host $(WORKER_HOST)) $(if $(ADVERTISE_HOST),--advertise-host $(ADVERTISE_HOST))

down: $(STAMP)         ## stop every process of the stack
	$(DEPLOY) down

status: $(STAMP)       ## processes, registered models, URLs
	$(DEPLOY) status

drain: $(STAMP)        ## this host's workers leave the dispatch, finish their requests, stop
	$(DEPLOY) drain

logs: $(STAMP)         ## last lines of every log; PROGRAM=worker-NAME for one, FOLLOW=1 to follow
	$(DEPLOY) logs $(PROGRAM) $(if $(FOLLOW),-f)

test: $(STAMP)         ## the whole test suite (PYTEST_ARGS="-k name -x" to narrow it)
	$(PY) -m pytest $(PYTEST_ARGS)

install: $(STAMP)

# torch goes in first and pinned: its CPU wheel is on local disk here, and any other
# torch requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

clean:                 ## remove the venv and the run dir (not the model cache)
	-$(DEPLOY) down
	rm -rf $(VENV) run
