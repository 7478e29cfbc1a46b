//! Project tasks, run as `cargo xtask <task>`:
//!
//! - `plugins`: build every crate under `plugins/` into `target/plugins/<crate>.wasm`,
//!   and the JavaScript plugins under `plugins/js/` (with npm);
//! - `build-plugin DIR`: build the plugin crate in DIR (one of its own, as
//!   `syncd plugin new` makes) into `DIR/<crate>.wasm`;
//! - `test`: build the plugins, then run every test of the workspace;
//! - `demo`: build everything, start the reference Client System and syncd with
//!   `sync.toml`, enqueue sample readings, show them arriving, stop everything;
//! - `bench`: build in release mode and print the benchmarks' figures.

mod demo;
mod plugins;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

/// Where things are.
pub struct Workspace {
    /// The repository's root.
    pub root: PathBuf,
    /// The workspace's target directory.
    pub target: PathBuf,
    /// The cargo that runs this xtask.
    pub cargo: PathBuf,
}

impl Workspace {
    fn locate() -> Result<Self> {
        let manifest_dir = PathBuf::from(
            std::env::var_os("CARGO_MANIFEST_DIR")
                .context("run this through cargo: `cargo xtask …`")?,
        );
        let root = manifest_dir
            .parent()
            .context("xtask lives in a folder of the workspace")?
            .to_path_buf();
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let cargo = std::env::var_os("CARGO")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("cargo"));
        Ok(Self {
            root,
            target,
            cargo,
        })
    }
}

/// Runs a command to completion, failing unless it succeeded.
pub fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("failed to start {:?}", command.get_program()))?;
    if !status.success() {
        bail!("{:?} failed: {status}", command.get_program());
    }
    Ok(())
}

const USAGE: &str = "usage: cargo xtask <plugins|build-plugin|test|demo|bench|reliability>

  plugins   build every crate under plugins/ into target/plugins/<crate>.wasm,
            and with npm the JavaScript plugins under plugins/js/
  build-plugin DIR
            build the plugin crate in DIR (made by `syncd plugin new`, say) into
            DIR/<crate>.wasm
  test      build the plugins, run their own tests natively, then every test
            of the workspace
  demo      run syncd against the reference Client System on loopback
  bench     build in release mode, run the benchmarks, print their figures and
            gather them into target/bench/bench.json (options: --readings N
            end to end [100000], --large N drain backlog [1000000; 10000000 is
            the long one], --postgres URL for the queue benchmark, --rate N and
            --seconds N of the steady load [10000, 20], --reload-readings N
            [1000000] and --trials N [3] of the reload benchmark)
  reliability
            the long crash, fault and fuzz runs, in release mode, printing their
            figures (options: --kills N [200], --chaos RATE [0.3],
            --fault-seconds N [120], --fuzz-seconds N per target [120], --seed N)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = Workspace::locate().and_then(|ws| match args.first().map(String::as_str) {
        Some("plugins") => plugins::build(&ws).map(drop),
        Some("build-plugin") => match &args[1..] {
            [dir] => plugins::build_crate(&ws, std::path::Path::new(dir)).map(drop),
            _ => bail!("usage: cargo xtask build-plugin DIR"),
        },
        Some("test") => test(&ws, &args[1..]),
        Some("demo") => demo::run(&ws),
        Some("bench") => bench(&ws, &args[1..]),
        Some("reliability") => reliability(&ws, &args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => {
            eprintln!("{USAGE}");
            bail!("unknown or missing task")
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The benchmarks, each writing `target/bench/<name>.json`.
const BENCHES: &[&str] = &["queue", "reload", "e2e", "process", "scale_out"];

/// Builds the plugins, then runs the benchmarks in release mode; extra arguments go
/// to the benchmarks. Then gathers their figures into `target/bench/bench.json`, with
/// the machine and the commit, and prints the headline figures against the targets.
fn bench(ws: &Workspace, extra: &[String]) -> Result<()> {
    plugins::build(ws)?;
    let out = ws.target.join("bench");
    let file = |name: &str| out.join(format!("{name}.json"));
    for name in BENCHES {
        // A figure left from an earlier run must not pass for this run's.
        let _ = std::fs::remove_file(file(name));
    }
    let mut command = Command::new(&ws.cargo);
    command
        .current_dir(&ws.root)
        .args(["bench", "--locked", "-p", "syncd"]);
    for name in BENCHES {
        command.args(["--bench", name]);
    }
    run(command.arg("--").args(extra))?;

    let mut all = serde_json::Map::new();
    all.insert("machine".into(), machine(ws));
    for name in BENCHES {
        let path = file(name);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("benchmark {name} wrote no {}", path.display()))?;
        all.insert((*name).into(), serde_json::from_str(&text)?);
    }
    let all = serde_json::Value::Object(all);
    std::fs::write(out.join("bench.json"), serde_json::to_vec_pretty(&all)?)?;

    let figure = |path: &str| all.pointer(path).and_then(serde_json::Value::as_f64);
    let show = |what: &str, value: Option<f64>, target: &str| match value {
        Some(v) => println!("  {what:<40} {v:>9.2}   {target}"),
        None => println!("  {what:<40} {:>9}   {target}", "-"),
    };
    println!();
    println!(
        "headline figures (all in {})",
        out.join("bench.json").display()
    );
    show(
        "end to end, syncd / native floor",
        figure("/e2e/syncd_over_floor"),
        "target: at least 0.8",
    );
    show(
        "encoder, WASM / native",
        figure("/e2e/encoder_wasm_over_native"),
        "target: at most 1.3",
    );
    show(
        "encoder, instructions WASM / native",
        figure("/e2e/encoder_instructions_wasm_over_native"),
        "counted by callgrind: steady from run to run",
    );
    show(
        "drain speed, large backlog / small",
        figure("/queue/drain_ratio_large_over_small"),
        "target: about 1",
    );
    show(
        "drain, typical batch, large backlog / small",
        figure("/queue/drain_batch_speed_large_over_small"),
        "the middle 80% of batches",
    );
    show(
        "reload latency, cold compile, ms",
        figure("/reload/reload_cold_ms"),
        "",
    );
    show(
        "reload latency, cache hit, ms",
        figure("/reload/reload_cache_hit_ms"),
        "",
    );
    show(
        "start-up to first batch, warm cache, ms",
        figure("/process/startup_to_first_batch_warm_ms"),
        "",
    );
    show(
        "idle RSS, MiB",
        figure("/process/idle_rss_mib"),
        "target: under 30",
    );
    show(
        "CPU at steady load, share of one core",
        figure("/process/steady_cpu_share_of_one_core"),
        "",
    );
    show(
        "PostgreSQL, 2 processes / 1",
        figure("/scale_out/two_over_one"),
        "",
    );
    show(
        "PostgreSQL, 3 processes / 1",
        figure("/scale_out/three_over_one"),
        "",
    );
    Ok(())
}

/// What the figures were measured on: CPU, cores, memory, kernel, commit, time.
fn machine(ws: &Workspace) -> serde_json::Value {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned());
    let meminfo = read("/proc/meminfo");
    let memory_kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok());
    let output = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .current_dir(&ws.root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    serde_json::json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "memory_gib": memory_kib.map(|k| (k as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0),
        "kernel": output("uname", &["-sr"]),
        "commit": output("git", &["rev-parse", "--short", "HEAD"]),
        "dirty": output("git", &["status", "--porcelain"]).map(|s| !s.is_empty()),
        "date": output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
    })
}

/// The long reliability run: the crash, fault and fuzz tests of the suite, told by
/// their environment variables to run longer, in release mode, with their figures.
fn reliability(ws: &Workspace, args: &[String]) -> Result<()> {
    let mut knobs: Vec<(&str, String)> = vec![
        ("SYNCD_CRASH_KILLS", "200".into()),
        ("SYNCD_CRASH_CHAOS", "0.3".into()),
        ("SYNCD_FAULT_SECONDS", "120".into()),
        ("SYNCD_FUZZ_SECONDS", "120".into()),
    ];
    let mut seed = None;
    let mut rest = args.iter();
    while let Some(option) = rest.next() {
        let value = rest
            .next()
            .with_context(|| format!("{option} needs a value"))?
            .clone();
        let variable = match option.as_str() {
            "--kills" => "SYNCD_CRASH_KILLS",
            "--chaos" => "SYNCD_CRASH_CHAOS",
            "--fault-seconds" => "SYNCD_FAULT_SECONDS",
            "--fuzz-seconds" => "SYNCD_FUZZ_SECONDS",
            "--seed" => {
                seed = Some(value);
                continue;
            }
            other => bail!("unknown option {other}\n\n{USAGE}"),
        };
        for knob in &mut knobs {
            if knob.0 == variable {
                knob.1 = value.clone();
            }
        }
    }
    plugins::build(ws)?;
    let mut cargo = Command::new(&ws.cargo);
    cargo.current_dir(&ws.root).args([
        "test",
        "--release",
        "--locked",
        "-p",
        "syncd",
        "--test",
        "crash",
        "--test",
        "faults",
        "--test",
        "fuzz",
        "--",
        "--nocapture",
        "--test-threads",
        "1",
    ]);
    for (variable, value) in &knobs {
        eprintln!("xtask: {variable}={value}");
        cargo.env(variable, value);
    }
    if let Some(seed) = seed {
        for variable in ["SYNCD_CRASH_SEED", "SYNCD_FAULT_SEED", "SYNCD_FUZZ_SEED"] {
            cargo.env(variable, &seed);
        }
    }
    run(&mut cargo)
}

/// Builds the plugins, then runs every test; extra arguments go to `cargo test`.
fn test(ws: &Workspace, extra: &[String]) -> Result<()> {
    if Command::new("npm").arg("--version").output().is_err() {
        bail!(
            "the tests need npm, to build the JavaScript plugin under plugins/js/ \
             (Debian: apt-get install nodejs npm)"
        );
    }
    plugins::build(ws)?;
    // The plugins' own tests, natively: their logic without the host.
    run(Command::new(&ws.cargo)
        .current_dir(ws.root.join("plugins"))
        .args(["test", "--workspace", "--locked", "--target-dir"])
        .arg(ws.target.join("plugins-native"))
        .env_remove("CARGO_TARGET_DIR"))
    .context("the plugins' own tests failed")?;
    // The plugin kit's test follows the walkthrough of docs/plugins.md, which builds a
    // new plugin with this xtask's `build-plugin`.
    let xtask = std::env::current_exe().context("failed to locate the xtask binary")?;
    run(Command::new(&ws.cargo)
        .current_dir(&ws.root)
        .args(["test", "--workspace", "--locked"])
        .env("SYNCD_XTASK", xtask)
        .args(extra))
}
