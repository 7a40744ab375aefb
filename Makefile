# A thin task runner: every target is one script or one tool call.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= $(CURDIR)/.venv
export COMFYBAKE_VENV := $(VENV)
export PATH := $(VENV)/bin:$(PATH)

.PHONY: help up provision down test lint bootstrap base-image

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

# `make up` checks its sources (scripts/preflight.py) before bootstrap and the bake: up.sh runs both.
up: ## The main job: bake a container image (TARGET=cpu; OFFLINE=<folder of mirrors>), run it, print where ComfyUI answers
	COMFYBAKE_TARGET=$(or $(TARGET),cpu) COMFYBAKE_OFFLINE="$(or $(OFFLINE),$(COMFYBAKE_OFFLINE))" COMFYBAKE_BOOTSTRAP=scripts/bootstrap.sh scripts/up.sh

provision: bootstrap ## Converge a local systemd container (INVENTORY=inventories/local, MOUNTS="src:dst ...")
	$(if $(INVENTORY),COMFYBAKE_INVENTORY=$(INVENTORY)) $(if $(MOUNTS),COMFYBAKE_MOUNTS="$(MOUNTS)") scripts/local.sh up

down: ## Remove the containers made by `make up` and `make provision`
	docker rm -f comfybake-up >/dev/null 2>&1 || true
	scripts/local.sh down

test: bootstrap ## Every test: lints, unit and harness tests, molecule scenarios
	pytest

lint: bootstrap ## Only the lint gates
	pytest tests/lint

bootstrap: ## Install what the main job and tests need (packages, Docker engine, venv, base image)
	scripts/bootstrap.sh

base-image: ## Rebuild the local systemd base image even if it is cached
	scripts/base-image.sh --force
