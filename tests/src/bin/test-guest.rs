//! Prints the path of a built test guest: `test-guest hello` for `hello.elf`, or
//! `test-guest bootinfo.bzimage` for a guest image that is not an ELF file (used by
//! `make run` and the benchmarks, which cannot know cargo's build-script output
//! directory).

fn main() -> std::process::ExitCode {
    let known = || {
        let mut all = hpcvm_tests::GUESTS.to_vec();
        all.extend_from_slice(hpcvm_tests::GUEST_FILES);
        all.join(", ")
    };
    let Some(name) = std::env::args().nth(1) else {
        eprintln!("usage: test-guest NAME   (one of: {})", known());
        return std::process::ExitCode::from(2);
    };
    let path = if hpcvm_tests::GUESTS.contains(&name.as_str()) {
        hpcvm_tests::guest(&name)
    } else if hpcvm_tests::GUEST_FILES.contains(&name.as_str()) {
        hpcvm_tests::guest_file(&name)
    } else {
        eprintln!("test-guest: no guest '{name}' (one of: {})", known());
        return std::process::ExitCode::from(2);
    };
    println!("{}", path.display());
    std::process::ExitCode::SUCCESS
}
