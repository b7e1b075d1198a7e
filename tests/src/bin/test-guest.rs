//! Prints the path of a built test guest: `test-guest hello` (used by `make run` and
//! the benchmarks, which cannot know cargo's build-script output directory).

fn main() -> std::process::ExitCode {
    let Some(name) = std::env::args().nth(1) else {
        eprintln!(
            "usage: test-guest NAME   (one of: {})",
            hpcvm_tests::GUESTS.join(", ")
        );
        return std::process::ExitCode::from(2);
    };
    if !hpcvm_tests::GUESTS.contains(&name.as_str()) {
        eprintln!(
            "test-guest: no guest '{name}' (one of: {})",
            hpcvm_tests::GUESTS.join(", ")
        );
        return std::process::ExitCode::from(2);
    }
    println!("{}", hpcvm_tests::guest(&name).display());
    std::process::ExitCode::SUCCESS
}
