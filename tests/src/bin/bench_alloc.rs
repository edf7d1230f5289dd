//! `qkd-macsec-bench-alloc`: what the agent's zeroing allocator (`qkd_macsec_agent::zalloc`)
//! costs, against the plain system allocator, measured in the same run (`cargo xtask bench
//! agent`, on the host).
//!
//! This program's own global allocator switches between the two at run time (both hand out
//! blocks of the system allocator, so a block may be freed under either mode); every workload
//! runs in alternating rounds under each, and the median per operation is reported:
//!
//! - `key_container`: decoding an ETSI 014 enc_keys answer with one 256-bit key (serde_json,
//!   base64, UUID; the allocation pattern of a key fetch after the HTTP layer);
//! - `mixed`: what an HTTP client and a logger do with the heap: a 16 KiB buffer grown in
//!   512-byte pieces, a formatted log line, a small JSON document, a short-lived map;
//! - `free_1mib`: allocating, touching and freeing 1 MiB (the worst case: zeroing costs a memset
//!   per byte freed).
//!
//! Prints `bench-result: agent.zalloc_<workload>_ns <zeroing>`, `..._ns_baseline <system>` and
//! `agent.zalloc_<workload>_ratio`, plus `agent.zalloc_loadavg` (the 1-minute load average when
//! it started: the ratio is only meaningful on a quiet machine).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use qkd_macsec_agent::etsi014::client::{decode_key_container, Expect};
use qkd_macsec_agent::zalloc::Zeroing;

static ZEROING: AtomicBool = AtomicBool::new(false);

/// The system allocator, with frees and reallocations through [`Zeroing`] while `ZEROING` is set.
struct Switch;

// SAFETY: every path ends in the system allocator with the caller's layout; `Zeroing` only adds
// writes into blocks still owned.
unsafe impl GlobalAlloc for Switch {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract.
        unsafe {
            if ZEROING.load(Ordering::Relaxed) {
                Zeroing(System).dealloc(ptr, layout)
            } else {
                System.dealloc(ptr, layout)
            }
        }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract.
        unsafe {
            if ZEROING.load(Ordering::Relaxed) {
                Zeroing(System).realloc(ptr, layout, new_size)
            } else {
                System.realloc(ptr, layout, new_size)
            }
        }
    }
}

#[global_allocator]
static GLOBAL: Switch = Switch;

const ROUNDS: usize = 9;

/// One benchmarked operation; the argument is the call's index.
type Workload<'a> = Box<dyn FnMut(u64) + 'a>;

fn key_container_body() -> Vec<u8> {
    br#"{"keys":[{"key_ID":"0123abcd-4567-89ef-0123-456789abcdef","key":"q83vASNFZ4mrze8BI0VniavN7wEjRWeJq83vASNFZ4k=","key_extension":{"qkd_macsec_expires_in_ms":10000}}],"key_container_extension":{}}"#.to_vec()
}

fn key_container(body: &[u8]) {
    let keys = decode_key_container(
        "https://kme-a.example:8443/api/v1/keys/SAE_B/enc_keys?number=1&size=256",
        zeroize::Zeroizing::new(body.to_vec()),
        Instant::now(),
        Expect::Count(1),
        Some(256),
    )
    .expect("a valid key container");
    black_box(keys);
}

fn mixed(i: u64) {
    let mut buf = Vec::new();
    let piece = [0x5au8; 512];
    while buf.len() < 16 << 10 {
        buf.extend_from_slice(&piece);
    }
    black_box(&buf);
    let line = format!(
        "2026-12-03T07:35:25.882343Z INFO link=gw-a-link key_id=32e1f7c4-7b8f-44b6-b358-{i:012x} kn={i} an={} rekey_ms=12.5 transmitting with a fresh key",
        i % 4
    );
    black_box(line);
    let doc = serde_json::json!({"link": "gw-a-link", "state": "secured", "rollovers": i, "keys_held": [1, 2, 3]});
    black_box(serde_json::to_vec(&doc).expect("json"));
    let mut m: HashMap<u64, Vec<u8>> = HashMap::new();
    for k in 0..16 {
        m.insert(k ^ i, vec![k as u8; 48]);
    }
    for k in 0..16 {
        black_box(m.remove(&(k ^ i)));
    }
}

fn free_1mib() {
    let mut v = vec![0u8; 1 << 20];
    for b in v.iter_mut().step_by(4096) {
        *b = 1;
    }
    black_box(&v);
}

/// Median ns per call of `f` over [`ROUNDS`] rounds of `n` calls, for (zeroing, system).
fn measure(n: u64, mut f: impl FnMut(u64)) -> (f64, f64) {
    let mut z = Vec::new();
    let mut s = Vec::new();
    for round in 0..ROUNDS * 2 {
        // Alternate the order so that drift (frequency, other load) hits both alike.
        let zeroing = (round % 2 == 0) == (round / 2 % 2 == 0);
        ZEROING.store(zeroing, Ordering::SeqCst);
        let t = Instant::now();
        for i in 0..n {
            f(i);
        }
        let per = t.elapsed().as_nanos() as f64 / n as f64;
        if zeroing {
            z.push(per);
        } else {
            s.push(per);
        }
    }
    ZEROING.store(false, Ordering::SeqCst);
    (median(z), median(s))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Calls per round so that a round takes about 50 ms.
fn calls_for(mut f: impl FnMut(u64)) -> u64 {
    let t = Instant::now();
    let mut n = 0;
    while t.elapsed() < Duration::from_millis(50) {
        f(n);
        n += 1;
    }
    n.max(10)
}

fn main() {
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(f64::NAN);
    println!("bench-result: agent.zalloc_loadavg {load}");
    let body = key_container_body();
    let work: [(&str, Workload); 3] = [
        ("key_container", Box::new(|_| key_container(&body))),
        ("mixed", Box::new(mixed)),
        ("free_1mib", Box::new(|_| free_1mib())),
    ];
    for (name, mut f) in work {
        let n = calls_for(&mut f);
        let (z, s) = measure(n, &mut f);
        eprintln!(
            "{name}: zeroing {z:.0} ns, system {s:.0} ns per call, ratio {:.3} ({n} calls x {ROUNDS} rounds each)",
            z / s
        );
        println!("bench-result: agent.zalloc_{name}_ns {z:.1}");
        println!("bench-result: agent.zalloc_{name}_ns_baseline {s:.1}");
        println!("bench-result: agent.zalloc_{name}_ratio {:.4}", z / s);
    }
}
