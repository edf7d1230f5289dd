use which::which;

/// Tells cargo to rebuild when bpf-linker changes: a new linker can produce a different object.
fn main() {
    let bpf_linker = which("bpf-linker").expect(
        "bpf-linker not found on PATH: run `cargo xtask setup` (it builds bpf-linker on LLVM 22)",
    );
    println!(
        "cargo:rerun-if-changed={}",
        bpf_linker.to_str().unwrap_or_default()
    );
}
