//! The programs' own log records (aya-log) reach the agent's tracing at DEBUG, with the
//! interface and direction, for the rare events they are written for (malformed SecTAG, unknown
//! SA, rate-limited TLV, stall drop); and the programs are loaded without them unless tracing
//! shows the kernel target at DEBUG. Needs root; fails loudly without it.

mod ebpf_support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ebpf_support::*;
use qkd_macsec_agent::dataplane::klog::TARGET;
use qkd_macsec_agent::dataplane::{DataplaneEvent, Gcra, LldpRateLimits, Sci};
use qkd_macsec_agent::lldp::{LLDP_OUI, LLDP_SUBTYPE};

/// Everything the subscriber writes, shared with the test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A subscriber for this thread writing into the returned buffer, filtered by `filter`.
fn capture(filter: &str) -> (Captured, tracing::subscriber::DefaultGuard) {
    let out = Captured::default();
    let w = out.clone();
    let sub = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(move || w.clone())
        .with_ansi(false)
        .finish();
    (out, tracing::subscriber::set_default(sub))
}

fn project_lldpdu(src: [u8; 6], marker: &[u8]) -> Vec<u8> {
    let mut info = LLDP_OUI.to_vec();
    info.push(LLDP_SUBTYPE);
    info.extend_from_slice(marker);
    lldp(
        src,
        &[lldp_head(src), tlv(127, &info), tlv(0, &[])].concat(),
    )
}

#[test]
fn rare_data_plane_events_are_logged_at_debug_with_interface_and_direction() {
    let (out, _sub) = capture(&format!("info,{TARGET}=debug"));
    let rig = Rig::new("klog");
    let _in_a = rig.enter_a();
    let mut dp = rig.attach();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut events = rt.block_on(async { dp.take_events() }).unwrap();
    dp.set_lldp_rate_limits(LldpRateLimits {
        per_source: Gcra::new(1, 1),
        ..LldpRateLimits::DEFAULT
    })
    .unwrap();
    let tx = rig.b_sender();
    let (src, dst) = (rig.b_mac.0, rig.a_mac.0);
    let sci = Sci::from_mac_port(src, 7);
    let mut bad = SecTag::with_sci(sci, 1, 5);
    bad.tci |= 0x80; // version bit
    tx.send_raw(&macsec(src, dst, bad, 64, b"bad")).unwrap();
    tx.send_raw(&macsec(src, dst, SecTag::with_sci(sci, 2, 9), 64, b"unk"))
        .unwrap();
    for i in 0..3u8 {
        tx.send_raw(&project_lldpdu(src, &[b'k', i])).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    dp.set_stall(true).unwrap();
    tx.send_raw(&ipv4(src, dst, b"stalled")).unwrap();

    // The stream writes the records out while it waits for events.
    let mut delivered = 0;
    rt.block_on(async {
        while let Ok(ev) = tokio::time::timeout(Duration::from_millis(500), events.next()).await {
            if let DataplaneEvent::Lldp(_) = ev.expect("event parses") {
                delivered += 1;
            }
        }
    });
    assert_eq!(delivered, 1, "one TLV within the 1/s bucket");
    let text = out.text();
    assert!(
        text.contains("kernel_log=true"),
        "attach says the programs were loaded with logging:\n{text}"
    );
    let records: Vec<&str> = text.lines().filter(|l| l.contains(TARGET)).collect();
    let unknown = format!(
        "MACsec frame of an unregistered SA: SCI {:016x} AN 2",
        sci.0
    );
    let mac = rig.b_mac.to_string().to_lowercase();
    let limited = format!("project TLV from {mac} over its rate limit");
    for (what, fragment) in [
        ("malformed SecTAG", "SecTAG version bit set"),
        ("unknown SA", unknown.as_str()),
        ("rate-limited TLV", limited.as_str()),
        ("stall drop", "stall: dropping data frames"),
    ] {
        let hit = records
            .iter()
            .find(|l| l.contains(fragment))
            .unwrap_or_else(|| panic!("no {what} record ({fragment:?}) in:\n{text}"));
        assert!(
            hit.contains("DEBUG") && hit.contains("qa0") && hit.contains("rx"),
            "{what}: a DEBUG record naming the interface and direction: {hit}"
        );
    }
    // Nothing for the frames that were fine, nothing on the delivered TLV.
    assert!(
        records.len() <= 4 * std::thread::available_parallelism().map_or(2, |n| n.get()) + 4,
        "sampled records only:\n{text}"
    );
    dp.shutdown(false).unwrap();
}

#[test]
fn without_debug_for_the_kernel_target_the_programs_load_without_logging() {
    let (out, _sub) = capture("info");
    let rig = Rig::new("klog0");
    let _in_a = rig.enter_a();
    let mut dp = rig.attach();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut events = rt.block_on(async { dp.take_events() }).unwrap();
    let tx = rig.b_sender();
    let (src, dst) = (rig.b_mac.0, rig.a_mac.0);
    let mut bad = SecTag::with_sci(Sci::from_mac_port(src, 7), 1, 5);
    bad.tci |= 0x80;
    tx.send_raw(&macsec(src, dst, bad, 64, b"bad")).unwrap();
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_millis(300), events.next()).await;
    });
    assert_eq!(dp.if_counters().unwrap().rx_malformed.frames, 1);
    let text = out.text();
    assert!(
        text.contains("kernel_log=false"),
        "attach says the programs were loaded without logging:\n{text}"
    );
    assert!(!text.contains(TARGET), "no kernel records:\n{text}");
    dp.shutdown(false).unwrap();
}
