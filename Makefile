# Entry points. `make test` and `make demo` work on a fresh machine: the stack
# script installs what is missing (tansu, redis-server, the BigQuery emulator).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
STACK := scripts/stack.sh
# System packages the build needs (libcurl's headers, for OIDC): installed if missing.
BUILD_DEPS := scripts/build-deps.sh
# A full disk shows up late and obscurely (the linker dies with "Bus error"):
# say so first. A first run took 5.6 GiB at its peak (installs included), 3.4 GiB
# of it left in target/.
DISK_CHECK = dir="$(TARGET_DIR)"; while [ ! -d "$$dir" ]; do dir=$$(dirname "$$dir"); done; \
  free_gb=$$(df -Pk "$$dir" | awk 'NR == 2 { print int($$4 / 1048576) }'); \
  [ -z "$$free_gb" ] || [ "$$free_gb" -ge 6 ] || echo "warning: $$free_gb GiB free on the disk of $$dir; a first make test needs about 6 GiB (free some space, or set CARGO_TARGET_DIR to a larger disk)" >&2
# Where cargo puts binaries: CARGO_TARGET_DIR or build.target-dir may move it.
TARGET_DIR = $(shell cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')

.PHONY: build test unit lint fmt stack-up stack-down clean bench faults demo

build:
	@$(BUILD_DEPS)
	cargo build --workspace --release

## test: start the local stack (with a Redis Cluster beside the standalone Redis:
## redis-sink's end-to-end tests run on both), run every test (the live page's in
## headless Chromium, installed if missing), print any test fixture that failed
## once and was made again, stop the stack even on failure.
test:
	@$(BUILD_DEPS)
	@$(DISK_CHECK)
	@scripts/chromium.sh
	@STACK_REDIS=both $(STACK) up > /dev/null
	@set +e; eval "$$($(STACK) env)"; \
	  cargo build --workspace --bins || { $(STACK) down; exit 1; }; \
	  cargo nextest --version >/dev/null 2>&1 && runner="cargo nextest run --workspace --no-fail-fast" || runner="cargo test --workspace --no-fail-fast"; \
	  retries="$$STACK_DIR/logs/fixture-retries.log"; rm -f "$$retries"; \
	  $$runner; status=$$?; \
	  if [ -s "$$retries" ]; then echo "test fixtures that failed once and were made again:"; cat "$$retries"; fi; \
	  $(STACK) down; exit $$status

## unit: tests that need no stack.
unit:
	@$(BUILD_DEPS)
	cargo test --workspace --lib --bins

## lint: formatting, clippy, and the supply chain (deny.toml: licenses, bans,
## sources). cargo-deny is installed once into ~/.cargo/bin (about 2.5 min).
CARGO_DENY_VERSION := 0.20.2
lint:
	@$(BUILD_DEPS)
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	@cargo deny --version 2>/dev/null | grep -qF '$(CARGO_DENY_VERSION)' \
	  || cargo install --locked cargo-deny@$(CARGO_DENY_VERSION)
	cargo deny check licenses bans sources

fmt:
	cargo fmt --all

stack-up:
	@$(STACK) up

stack-down:
	@$(STACK) down

clean: stack-down
	cargo clean

## bench: release builds against the local stack; prints the figures.
bench:
	@$(BUILD_DEPS)
	cargo build --release --workspace --bins
	@$(STACK) up > /dev/null
	@set +e; eval "$$($(STACK) env)"; \
	  $(TARGET_DIR)/release/bench redis && $(TARGET_DIR)/release/bench cluster && \
	  $(TARGET_DIR)/release/bench bigquery && \
	  $(TARGET_DIR)/release/bench bigquery --skip-emulator --malformed 0.01 && \
	  $(TARGET_DIR)/release/bench freshness && $(TARGET_DIR)/release/bench api; status=$$?; \
	  $(STACK) down; exit $$status

## faults: the fault suite against the local stack (release builds); prints
## one table and fails on any loss or double count. FAULTS="--only sigkill"
## runs a subset.
faults:
	@$(BUILD_DEPS)
	cargo build --release --workspace --bins
	@STACK_REDIS=both $(STACK) up > /dev/null
	@set +e; eval "$$($(STACK) env)"; \
	  $(TARGET_DIR)/release/faults $(FAULTS); status=$$?; \
	  $(STACK) down; exit $$status

## demo: the whole pipeline locally with live rankings (DEMO_SECONDS, default 30).
demo:
	@scripts/demo.sh
