//! The MACsec test VM: boots Debian's generic kernel in qemu with the host's root filesystem shared
//! read-only (9p + a tmpfs overlay), runs a job script as root, and reports its exit status over
//! the serial console. See docs/testing.md.

use std::collections::VecDeque;
use std::fs;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::setup::{self, VmImage};
use crate::util::{self, sh_quote};

/// Default for `--timeout` / QKD_MACSEC_VM_TIMEOUT: generous, since TCG is slow and a whole test
/// batch runs in one boot.
const DEFAULT_TIMEOUT_SECS: u64 = 900;

/// A job for the VM: a shell script body run by /bin/sh in `cwd` with exactly `env`.
pub struct Job {
    pub cwd: PathBuf,
    pub env: Vec<(String, String)>,
    /// Shell commands; the job's exit status is the script's. `mark <words>` reports a line to
    /// the host (collected in [`Outcome::marks`] instead of being printed).
    pub body: String,
    pub timeout: Duration,
}

/// How a VM job ended.
pub struct Outcome {
    /// The job script's exit status.
    pub status: i32,
    /// Words passed to `mark` by the job, one entry per call, in order.
    pub marks: Vec<String>,
    /// Launch of qemu to the result line.
    pub elapsed: Duration,
    /// Launch of qemu to the start of the job (boot time).
    pub boot: Duration,
}

/// The environment passed from the host into the VM: RUST_*, CARGO_*, QKD_* and a few basics.
pub fn passthrough_env() -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            k.starts_with("RUST_")
                || k.starts_with("RUSTUP_")
                || k.starts_with("CARGO")
                || k.starts_with("QKD_")
                || matches!(k.as_str(), "PATH" | "LD_LIBRARY_PATH" | "TERM" | "NO_COLOR")
        })
        .collect();
    env.retain(|(k, _)| k != "HOME" && k != "USER");
    env.push(("HOME".into(), "/root".into()));
    env.push(("USER".into(), "root".into()));
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push((
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ));
    }
    env
}

/// Timeout from the flag, else QKD_MACSEC_VM_TIMEOUT, else the default.
pub fn timeout(flag: Option<u64>) -> Result<Duration> {
    let secs = match flag {
        Some(s) => s,
        None => match std::env::var("QKD_MACSEC_VM_TIMEOUT") {
            Ok(v) => v.trim().parse().with_context(|| {
                format!("QKD_MACSEC_VM_TIMEOUT={v:?} is not a number of seconds")
            })?,
            Err(_) => DEFAULT_TIMEOUT_SECS,
        },
    };
    Ok(Duration::from_secs(secs))
}

/// `cargo xtask vm-run`.
pub fn vm_run(
    cwd: Option<PathBuf>,
    envs: Vec<String>,
    timeout_flag: Option<u64>,
    cmd: Vec<String>,
) -> Result<u8> {
    let cwd = match cwd {
        Some(d) => fs::canonicalize(&d)
            .with_context(|| format!("--cwd {}: no such directory", d.display()))?,
        None => std::env::current_dir()?,
    };
    let mut env = passthrough_env();
    for e in envs {
        let (k, v) = e
            .split_once('=')
            .ok_or_else(|| anyhow!("--env {e:?}: expected KEY=VALUE"))?;
        env.retain(|(k2, _)| k2 != k);
        env.push((k.to_owned(), v.to_owned()));
    }
    let job = Job {
        cwd,
        env,
        body: exec_line(&cmd),
        timeout: timeout(timeout_flag)?,
    };
    let out = run_job(&job)?;
    eprintln!(
        "[vm] exit status {} (boot {:.1} s, total {:.1} s)",
        out.status,
        out.boot.as_secs_f64(),
        out.elapsed.as_secs_f64()
    );
    Ok(exit_code(out.status))
}

/// `cargo xtask vm-runner BIN ARGS...` (a cargo runner): runs BIN in the current directory inside
/// the VM with the RUST_*/CARGO_* environment.
pub fn vm_runner(cmd: Vec<String>) -> Result<u8> {
    let bin = fs::canonicalize(&cmd[0])
        .with_context(|| format!("vm-runner: test binary {} not found", cmd[0]))?;
    let mut full = vec![bin.to_string_lossy().into_owned()];
    full.extend(cmd[1..].iter().cloned());
    let job = Job {
        cwd: std::env::current_dir()?,
        env: passthrough_env(),
        body: exec_line(&full),
        timeout: timeout(None)?,
    };
    let out = run_job(&job)?;
    Ok(exit_code(out.status))
}

/// Runs `argv` inside the VM with `--summary-file <path>` appended, for a program (the demo,
/// the soak) that writes a one-line JSON summary there. Files written in the VM are thrown away
/// and the console is the only way back out, so the job sends the summary as a `mark`, in hex
/// because the job shell's echo would interpret backslashes in the JSON. Returns the outcome and
/// the summary (None when the program wrote none).
pub fn run_with_summary(
    argv: &[String],
    name: &str,
    timeout: Duration,
) -> Result<(Outcome, Option<String>)> {
    let summary = format!("/tmp/qkd-macsec-{name}-summary.json");
    let mut words: Vec<String> = argv.iter().map(|w| sh_quote(w)).collect();
    words.extend(["--summary-file".into(), sh_quote(&summary)]);
    let body = format!(
        "{}\nrc=$?\n[ -s {summary} ] && mark \"summary $(od -An -v -tx1 {summary} | tr -d ' \\n')\"\nexit $rc\n",
        words.join(" ")
    );
    let job = Job {
        cwd: util::repo_root(),
        env: passthrough_env(),
        body,
        timeout,
    };
    let out = run_job(&job)?;
    let summary = out
        .marks
        .iter()
        .rev()
        .find_map(|m| m.strip_prefix("summary "))
        .and_then(unhex);
    Ok((out, summary))
}

/// Decodes the hex [`run_with_summary`] sends the summary in; None when it is not valid UTF-8
/// hex.
fn unhex(s: &str) -> Option<String> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

fn exec_line(cmd: &[String]) -> String {
    let words: Vec<String> = cmd.iter().map(|w| sh_quote(w)).collect();
    format!("exec {}\n", words.join(" "))
}

fn exit_code(status: i32) -> u8 {
    u8::try_from(status).unwrap_or(1)
}

/// The VM image, running the set-up steps for the kernel and initramfs when they are missing.
pub fn image() -> Result<VmImage> {
    match setup::existing_vm_image() {
        Some(img) => Ok(img),
        None => {
            eprintln!("[vm] VM image missing or stale; running the VM set-up steps");
            setup::vm_image(false)
        }
    }
}

/// qemu accelerator and CPU model: TCG unless the CPU offers vmx/svm (then KVM);
/// QKD_MACSEC_VM_ACCEL=tcg|kvm forces either.
fn accel() -> Result<(&'static str, &'static str)> {
    let forced = std::env::var("QKD_MACSEC_VM_ACCEL").unwrap_or_default();
    let kvm = match forced.as_str() {
        "kvm" => true,
        "tcg" => false,
        "" => {
            let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            let hw = cpuinfo
                .lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
            // A /dev/kvm without vmx/svm (a software hypervisor) crashes or crawls with Debian's
            // kernel: TCG is the safe default.
            hw && Path::new("/dev/kvm").exists()
        }
        other => bail!("QKD_MACSEC_VM_ACCEL={other:?}: expected tcg or kvm"),
    };
    Ok(if kvm { ("kvm", "host") } else { ("tcg", "max") })
}

fn nonce() -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{:x}{:x}", std::process::id(), t & 0xffff_ffff_ffff)
}

enum Event {
    Line(String),
    Eof,
}

/// Boots the VM, runs the job, streams its output to stdout, returns how it ended.
pub fn run_job(job: &Job) -> Result<Outcome> {
    let image = image()?;
    let nonce = nonce();
    let jobs_dir = util::vm_cache_dir().join("jobs").join(&nonce);
    fs::create_dir_all(&jobs_dir)
        .with_context(|| format!("cannot create {}", jobs_dir.display()))?;
    let script_path = jobs_dir.join("job.sh");
    let mut script = String::from("# generated by cargo xtask (vm)\n");
    for (k, v) in &job.env {
        if k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !k.is_empty() {
            script.push_str(&format!("export {k}={}\n", sh_quote(v)));
        }
    }
    script.push_str(&format!(
        "mark() {{ echo \"QKD-VM-MARK {nonce} $*\"; }}\n\
         cd {} || {{ echo \"vm: cannot cd to {}\"; exit 125; }}\n",
        sh_quote(&job.cwd.to_string_lossy()),
        job.cwd.display()
    ));
    script.push_str(&job.body);
    fs::write(&script_path, script)
        .with_context(|| format!("cannot write {}", script_path.display()))?;
    let result = boot(&image, job, &nonce, &script_path);
    let _ = fs::remove_dir_all(&jobs_dir);
    result
}

fn boot(image: &VmImage, job: &Job, nonce: &str, script: &Path) -> Result<Outcome> {
    let (accel, cpu) = accel()?;
    let mem = std::env::var("QKD_MACSEC_VM_MEM").unwrap_or_else(|_| "1G".into());
    let cpus = std::env::var("QKD_MACSEC_VM_CPUS").unwrap_or_else(|_| "2".into());
    let verbose = std::env::var("QKD_MACSEC_VM_VERBOSE").is_ok_and(|v| v == "1");
    for p in [&image.vmlinuz, &image.initramfs] {
        if !p.is_file() {
            bail!("{} missing; run `cargo xtask setup`", p.display());
        }
    }
    let kernel = if image.vmlinux.is_file() {
        &image.vmlinux
    } else {
        &image.vmlinuz
    };
    let append = format!(
        // lpj: skips the delay-loop calibration, which fails slowly under TCG (about 2 s);
        // cryptomgr.notests: no crypto self-tests at module load; edd=off: no BIOS disk probe.
        "console=ttyS0 panic=-1 loglevel={} random.trust_cpu=on mitigations=off lpj=9781636 \
         cryptomgr.notests edd=off \
         qkd_nonce={nonce} qkd_job={} qkd_modtree={} qkd_kver={}",
        if verbose { 7 } else { 4 },
        script.display(),
        image.module_tree.display(),
        image.kernel_version
    );
    for p in [script, image.module_tree.as_path()] {
        // The kernel command line splits on spaces and the parameters must be dot-free words.
        let s = p.to_string_lossy();
        if s.contains(char::is_whitespace) {
            bail!("path {s:?} contains whitespace; move the repository or set QKD_MACSEC_VM_CACHE");
        }
    }
    let mut qemu = Command::new("qemu-system-x86_64");
    if let Some(bios) = std::env::var("QKD_MACSEC_VM_BIOS")
        .ok()
        .filter(|b| !b.is_empty())
    {
        qemu.args(["-bios", &bios]);
    }
    qemu.args([
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-no-reboot",
        "-M",
        "q35",
        "-m",
        &mem,
        "-smp",
        &cpus,
        "-accel",
        accel,
        "-cpu",
        cpu,
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-append",
        &append,
    ])
    .arg("-kernel")
    .arg(kernel)
    .arg("-initrd")
    .arg(&image.initramfs)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = qemu.spawn().context(
        "cannot start qemu-system-x86_64; run `cargo xtask setup` (package qemu-system-x86)",
    )?;
    let stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(Event::Eof);
                    return;
                }
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\n', '\r']).to_owned();
                    if tx.send(Event::Line(line)).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let start_tag = format!("QKD-VM-START {nonce}");
    let result_tag = format!("QKD-VM-RESULT {nonce} ");
    let mark_tag = format!("QKD-VM-MARK {nonce} ");
    let fail_tag = format!("QKD-VM-INITFAIL {nonce} ");
    // Boot messages are held back and shown only when something goes wrong (or when verbose).
    let mut boot_log: VecDeque<String> = VecDeque::new();
    let mut started: Option<Duration> = None;
    let mut status: Option<i32> = None;
    let mut marks = Vec::new();
    let mut failure: Option<String> = None;
    let deadline = start + job.timeout;
    let out = std::io::stdout();
    loop {
        let now = Instant::now();
        if now >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            dump_boot_log(&boot_log, started.is_none());
            bail!(
                "VM run timed out after {} s ({}{}); raise it with --timeout or \
                 QKD_MACSEC_VM_TIMEOUT",
                job.timeout.as_secs(),
                if started.is_some() {
                    "the command was still running"
                } else {
                    "the VM never finished booting"
                },
                if marks.is_empty() {
                    String::new()
                } else {
                    format!("; reported so far: {}", marks.join("; "))
                }
            );
        }
        match rx.recv_timeout(deadline - now) {
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) | Ok(Event::Eof) => break,
            Ok(Event::Line(line)) => {
                if let Some(rest) = line.split_once(&result_tag).map(|(_, r)| r) {
                    status =
                        Some(rest.trim().parse().map_err(|_| {
                            anyhow!("unparsable result line from the VM: {line:?}")
                        })?);
                    break;
                } else if let Some(rest) = line.split_once(&mark_tag).map(|(_, r)| r) {
                    marks.push(rest.to_owned());
                } else if let Some(rest) = line.split_once(&fail_tag).map(|(_, r)| r) {
                    failure = Some(rest.to_owned());
                } else if line.contains(&start_tag) {
                    started = Some(start.elapsed());
                } else if started.is_some() {
                    let mut o = out.lock();
                    let _ = writeln!(o, "{line}");
                    let _ = o.flush();
                } else if verbose {
                    eprintln!("[vm boot +{:.2}s] {line}", start.elapsed().as_secs_f64());
                } else {
                    boot_log.push_back(line);
                    if boot_log.len() > 400 {
                        boot_log.pop_front();
                    }
                }
            }
        }
    }
    let elapsed = start.elapsed();
    // The guest powers off right after the result line; give qemu a moment, then make sure.
    let grace = Instant::now() + Duration::from_secs(5);
    while Instant::now() < grace {
        if child.try_wait().ok().flatten().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let qemu_status = child.wait().ok();
    drop(rx);
    let _ = reader.join();
    let qemu_err = err_reader.join().unwrap_or_default();
    if let Some(msg) = failure {
        dump_boot_log(&boot_log, true);
        bail!("VM init failed: {msg}");
    }
    match status {
        Some(status) => Ok(Outcome {
            status,
            marks,
            elapsed,
            boot: started.unwrap_or_default(),
        }),
        None => {
            dump_boot_log(&boot_log, true);
            bail!(
                "the VM stopped without a result line (qemu {}){}{}; {}",
                qemu_status.map_or("status unknown".to_owned(), |s| s.to_string()),
                if marks.is_empty() {
                    String::new()
                } else {
                    format!(", after reporting: {}", marks.join("; "))
                },
                if qemu_err.trim().is_empty() {
                    String::new()
                } else {
                    format!(", qemu said: {}", qemu_err.trim())
                },
                if started.is_some() {
                    "the guest kernel probably panicked while the command ran (see the output above)"
                } else {
                    "it never reached the command: see the boot log above, or rerun with \
                     QKD_MACSEC_VM_VERBOSE=1"
                }
            )
        }
    }
}

fn dump_boot_log(log: &VecDeque<String>, show: bool) {
    if show && !log.is_empty() {
        eprintln!("[vm] ---- boot log (last {} lines) ----", log.len());
        for l in log {
            eprintln!("[vm boot] {l}");
        }
        eprintln!("[vm] ---- end of boot log ----");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unhex_decodes_the_vm_summary() {
        assert_eq!(unhex("7b2261223a317d").as_deref(), Some("{\"a\":1}"));
        assert_eq!(unhex("7b2"), None);
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn exec_line_quotes_each_word() {
        assert_eq!(
            exec_line(&["echo".into(), "a b".into(), "it's".into()]),
            "exec 'echo' 'a b' 'it'\\''s'\n"
        );
    }

    #[test]
    fn exit_code_clamps_out_of_range() {
        assert_eq!(exit_code(3), 3);
        assert_eq!(exit_code(-1), 1);
        assert_eq!(exit_code(300), 1);
    }
}
