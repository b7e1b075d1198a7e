# hpcvm: build, demo, tests and benchmarks. Every target installs what it needs.
CARGO ?= cargo
RELEASE := target/release

GUEST := target/guest

.PHONY: all deps virtiofsd build guest guest-ib image mpi-deps run test lint bench clean

all: build

# Debian packages: gcc/as/ld for the test guests, a static busybox for job guests,
# mkfs.ext4 for the disk and image tests.
deps:
	@command -v gcc >/dev/null && command -v ld >/dev/null && command -v mkfs.ext4 >/dev/null && \
	  dpkg -s busybox-static >/dev/null 2>&1 || \
	  { apt-get update && apt-get install -y --no-install-recommends build-essential busybox-static e2fsprogs; }

# The Rust virtiofsd (crates.io) serves --share and the job's working directory:
# Debian 12 has only QEMU's old C one, which needs root. About a minute to build.
virtiofsd:
	@command -v virtiofsd >/dev/null || test -x $$HOME/.cargo/bin/virtiofsd || { \
	  dpkg -s libseccomp-dev libcap-ng-dev pkg-config >/dev/null 2>&1 || \
	    { apt-get update && apt-get install -y --no-install-recommends libseccomp-dev libcap-ng-dev pkg-config; }; \
	  $(CARGO) install --locked virtiofsd; }

build: deps virtiofsd
	$(CARGO) build --release --workspace --bins

# The default job guest in $(GUEST): the stripped kernel (built once, cached under
# ~/.cache/hpcvm), the static guest agent and busybox.
guest: deps
	@mkdir -p $(GUEST)
	$(CARGO) rustc --release -p hpcvm-agent --bin hpcvm-agent -- -C target-feature=+crt-static -C strip=symbols
	cp $(RELEASE)/hpcvm-agent $(GUEST)/hpcvm-agent.new && mv $(GUEST)/hpcvm-agent.new $(GUEST)/hpcvm-agent
	cp /bin/busybox $(GUEST)/busybox
	kernel=$$(guest-kernel/kernel/build.sh | tail -n 1) && test -f "$$kernel" && \
	  cp "$$kernel" $(GUEST)/vmlinux.new && mv $(GUEST)/vmlinux.new $(GUEST)/vmlinux

# The InfiniBand guest kernel (mlx5, verbs, IPoIB built in) beside it, for jobs that
# drive a passed-through ConnectX HCA or VF: `hpcvm run --kernel target/guest/vmlinux-ib`.
guest-ib: guest
	kernel=$$(guest-kernel/kernel/build.sh --flavor ib | tail -n 1) && test -f "$$kernel" && \
	  cp "$$kernel" $(GUEST)/vmlinux-ib.new && mv $(GUEST)/vmlinux-ib.new $(GUEST)/vmlinux-ib

# The MPI job image (guest-kernel/image/): Debian with Open MPI, HPCC and NetPIPE,
# built with mmdebstrap from this machine's apt sources, cached under ~/.cache/hpcvm
# and copied to $(GUEST)/mpi.ext4.
image: deps
	@mkdir -p $(GUEST)
	img=$$(guest-kernel/image/build.sh | tail -n 1) && test -f "$$img" && \
	  { cmp -s "$$img" $(GUEST)/mpi.ext4 || { cp "$$img" $(GUEST)/mpi.ext4.new && mv $(GUEST)/mpi.ext4.new $(GUEST)/mpi.ext4; }; }

# Host side of MPI jobs: mpicc for programs built on the host and run in the image,
# and hpcc/NetPIPE for the host column of the benchmark (the image's release).
mpi-deps:
	@command -v mpicc >/dev/null && command -v hpcc >/dev/null && command -v NPopenmpi >/dev/null || \
	  { apt-get update && apt-get install -y --no-install-recommends libopenmpi-dev openmpi-bin hpcc netpipe-openmpi; }

# The main job: boot the guest on /dev/kvm and run a command in it.
run: build guest
	$(RELEASE)/hpcvm run --cpus 2 --memory 512M -- uname -a

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Lints, then unit tests and real-KVM integration tests (tests reserve hugepages they
# need and give them back).
test: deps virtiofsd lint guest image mpi-deps
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace

# Tables (and a PNG of the ratios) in benches/results/; beside QEMU, in the same run.
bench: build guest image mpi-deps
	@command -v qemu-system-x86_64 >/dev/null && command -v gnuplot >/dev/null || \
	  { apt-get update && apt-get install -y --no-install-recommends qemu-system-x86 gnuplot-nox; }
	$(RELEASE)/hpcvm-bench

clean:
	$(CARGO) clean

# hpcvm under a real single-node Slurm on loopback (tests/slurm/): the test binary
# installs slurm-wlm and munge if missing, starts the cluster, runs its jobs and stops
# it again. About 5-6 minutes, most of it four real-guest boots, a 1-minute time
# limit and a requeued job's 2-minute hold; then the MPI image in both Slurm modes
# (slurm_mpi), about 4 more.
.PHONY: slurm-test
slurm-test: deps virtiofsd guest image mpi-deps
	$(CARGO) build -p vmm --bin hpcvm
	$(CARGO) test -p hpcvm-tests --test slurm --test slurm_mpi -- --test-threads=1

# The parsers under libFuzzer (fuzz/, cargo-fuzz on the nightly toolchain), FUZZ_RUNS
# inputs each (10 million by default; `make test` runs a short pass of the same
# targets on stable). Findings land in fuzz/artifacts/TARGET/.
FUZZ_RUNS ?= 10000000
FUZZ_TARGETS := api_request agent_stream agent_frames config_option
.PHONY: fuzz
fuzz:
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && for t in $(FUZZ_TARGETS); do \
	  mkdir -p corpus/$$t.run && cp corpus/$$t/seed-* corpus/$$t.run/ && \
	  $(CARGO) +nightly fuzz run $$t corpus/$$t.run -- -runs=$(FUZZ_RUNS) -max_len=4096 \
	    -print_final_stats=1 || exit 1; done
