//! A short mutation pass over each fuzz target on every `make test`: the seeds, then
//! mutations of them (deterministic, so a failure repeats). `make fuzz` runs the
//! same targets under libFuzzer for millions of inputs.

use hpcvm_tests::fuzz::{self, Mutator};

/// Runs `target` on its seeds and `n` mutations of them.
fn pass(name: &str, target: fn(&[u8]), n: usize) {
    let seeds = fuzz::seeds(name);
    assert!(!seeds.is_empty(), "{name} has seeds");
    let mut m = Mutator::new(0x5eed ^ name.len() as u64);
    for s in &seeds {
        target(s);
    }
    for i in 0..n {
        let a = &seeds[i % seeds.len()];
        let b = &seeds[(i / seeds.len()) % seeds.len()];
        let input = m.mutate(a, b);
        let caught = std::panic::catch_unwind(|| target(&input));
        assert!(caught.is_ok(), "{name} failed on input {input:?}");
    }
}

#[test]
fn api_requests_are_answered_or_refused_never_crash() {
    pass("api_request", fuzz::api_request, 200_000);
}

#[test]
fn any_guest_bytes_on_the_agent_channel_are_taken_safely() {
    pass("agent_stream", fuzz::agent_stream, 100_000);
}

#[test]
fn option_values_parse_or_are_refused_never_crash() {
    pass("config_option", fuzz::config_option, 200_000);
}

#[test]
fn the_agent_frame_decoder_is_the_same_in_any_chunking() {
    pass("agent_frames", fuzz::agent_frames, 200_000);
}
