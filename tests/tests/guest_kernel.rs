//! guest-kernel/kernel/build.sh's command line: flavours get their own cache entry,
//! and bad flavours are refused by name (with `--print-path`, nothing is built).

use std::path::PathBuf;
use std::process::Command;

fn build_sh(args: &[&str]) -> (Option<i32>, String, String) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../guest-kernel/kernel/build.sh");
    let cache = std::env::temp_dir().join(format!("hpcvm-kcache-{}", std::process::id()));
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .env("HPCVM_CACHE", &cache)
        .output()
        .expect("run build.sh");
    assert!(!cache.exists(), "--print-path created {}", cache.display());
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_ib_flavour_has_its_own_kernel_and_bad_flavours_are_named() {
    let (code, base, err) = build_sh(&["--print-path"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, ib, err) = build_sh(&["--flavor", "ib", "--print-path"]);
    assert_eq!(code, Some(0), "{err}");
    for p in [&base, &ib] {
        assert!(
            p.contains("hpcvm-kcache-") && p.ends_with("/vmlinux"),
            "{p}"
        );
    }
    assert_ne!(base, ib, "each flavour is cached under its own hash");

    let (code, out, err) = build_sh(&["--flavor", "nope", "--print-path"]);
    assert_eq!(code, Some(1));
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("no flavor 'nope'") && err.contains("config.nope.fragment"),
        "{err}"
    );
    let (code, _, err) = build_sh(&["--flavor", "../ib", "--print-path"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("bad flavor name '../ib'"), "{err}");
    let (code, _, err) = build_sh(&["--flavor"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--flavor needs a name"), "{err}");
}
