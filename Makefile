# A thin task runner: every target is one script or one tool call.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= $(CURDIR)/.venv
export COMFYBAKE_VENV := $(VENV)
export PATH := $(VENV)/bin:$(PATH)

.PHONY: help up down test lint bootstrap base-image

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

up: bootstrap ## The main job: converge a local systemd container with playbooks/site.yml
	scripts/local.sh up

down: ## Remove the local container made by `make up`
	scripts/local.sh down

test: bootstrap ## Every test: lints, unit and harness tests, molecule scenarios
	pytest

lint: bootstrap ## Only the lint gates
	pytest tests/lint

bootstrap: ## Install what the main job and tests need (packages, Docker engine, venv, base image)
	scripts/bootstrap.sh

base-image: ## Rebuild the local systemd base image even if it is cached
	scripts/base-image.sh --force
