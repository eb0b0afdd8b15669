# Two entry points for a fresh machine (see README): `make sweep` and `make test`.
# Setup is idempotent: the venv is (re)built only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: setup sweep test clean-artifacts

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@echo "setting up $(VENV) (torch, ray, open_clip, mlflow; ~3 min the first time) ..."
	@$(VENV)/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' > $(VENV)/install.log 2>&1 \
		|| (grep -v '^WARNING: Location' $(VENV)/install.log | tail -30; exit 1)
	@touch $(STAMP)
	@echo "setup done"

setup: $(STAMP)

sweep: $(STAMP)
	$(VENV)/bin/python jobs/sweep.py $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(ARGS)

clean-artifacts:
	rm -rf artifacts
