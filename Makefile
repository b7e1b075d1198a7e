# hpcvm: build, demo, tests and benchmarks. Every target installs what it needs.
CARGO ?= cargo
RELEASE := target/release

.PHONY: all deps build run test lint bench clean

all: build

# Debian packages for building the test guests (gcc, GNU as/ld).
deps:
	@command -v gcc >/dev/null && command -v ld >/dev/null || \
	  { apt-get update && apt-get install -y --no-install-recommends build-essential; }

build: deps
	$(CARGO) build --release --workspace --bins

# The main job: boot a guest on /dev/kvm and show what it printed.
run: build
	$(RELEASE)/hpcvm run --kernel "$$($(RELEASE)/test-guest bootinfo)" \
	  --cpus 2 --memory 128M --cmdline "hello.from=make-run"

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Lints, then unit tests and real-KVM integration tests (tests reserve hugepages they
# need and give them back).
test: deps lint
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace

bench: build
	@command -v qemu-system-x86_64 >/dev/null || \
	  { apt-get update && apt-get install -y --no-install-recommends qemu-system-x86; }
	$(RELEASE)/hpcvm-bench

clean:
	$(CARGO) clean
