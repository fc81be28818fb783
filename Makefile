# Every target sets itself up: libtorch (PyTorch 2.13.0) is installed once into ~/.cache/fedtext
# by scripts/libtorch-env.sh and reused by every clone; binaries get an rpath to it.
SHELL := /bin/bash
LIBTORCH := $(shell scripts/libtorch-env.sh)
export LIBTORCH
export RUSTFLAGS := -C link-arg=-Wl,-rpath,$(LIBTORCH)/lib
CLIENTS ?= 4

.PHONY: build demo test bench bench-criterion compose-demo compose-test lint k8s-validate

build:
	cargo build --release --bins

demo: build
	scripts/demo.sh

test:
	cargo build --release --bins
	scripts/minilm-env.sh >/dev/null   # the pretrained base the minilm tests read (once, 84 MB)
	cargo test --release --workspace
	deploy/k8s/validate.sh

# Kubernetes manifests, offline: kustomize render, schema validation (--strict), policy checks.
k8s-validate:
	deploy/k8s/validate.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --release --workspace --all-targets -- -D warnings

bench-criterion:
	cargo bench -p fl-server --bench aggregation
	cargo bench -p fl-model --bench local_training

bench: build
	bench/federation.sh

compose-demo: build
	deploy/compose-demo.sh $(CLIENTS)

compose-test: build
	deploy/test-compose.sh
