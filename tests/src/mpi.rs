//! The MPI image (`make image`) and MPI programs built on the host with `mpicc`,
//! for the tests that run several ranks inside one VM (tests/tests/mpi.rs, slurm.rs).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::proc::hpcvm_bin;

/// The MPI image `make image` puts beside the guest kernel.
pub fn mpi_image() -> PathBuf {
    let target = hpcvm_bin()
        .parent()
        .and_then(Path::parent)
        .expect("target directory")
        .to_path_buf();
    let image = target.join("guest/mpi.ext4");
    assert!(
        image.is_file(),
        "{} is missing: `make image` builds it (make test does)",
        image.display()
    );
    image
}

/// Builds tests/mpi/NAME.c with the host's mpicc into `out`.
pub fn mpicc(name: &str, out: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("mpi/{name}.c"));
    let st = Command::new("mpicc")
        .args(["-O2", "-o"])
        .arg(out)
        .arg(&src)
        .status()
        .expect("mpicc (libopenmpi-dev: `make mpi-deps` installs it)");
    assert!(st.success(), "mpicc {} failed", src.display());
}
