//! Project tasks, run as `cargo xtask <task>`:
//!
//! - `plugins`: build every crate under `plugins/` into `target/plugins/<crate>.wasm`;
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

const USAGE: &str = "usage: cargo xtask <plugins|test|demo|bench|reliability>

  plugins   build every crate under plugins/ into target/plugins/<crate>.wasm
  test      build the plugins, then run every test of the workspace
  demo      run syncd against the reference Client System on loopback
  bench     build in release mode and print the benchmarks' figures
            (options: --large N readings for the large backlog, --postgres URL)
  reliability
            the long crash, fault and fuzz runs, in release mode, printing their
            figures (options: --kills N [200], --chaos RATE [0.3],
            --fault-seconds N [120], --fuzz-seconds N per target [120], --seed N)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = Workspace::locate().and_then(|ws| match args.first().map(String::as_str) {
        Some("plugins") => plugins::build(&ws).map(drop),
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

/// Builds the plugins, then runs the benchmarks in release mode; extra arguments go
/// to the benchmark.
fn bench(ws: &Workspace, extra: &[String]) -> Result<()> {
    plugins::build(ws)?;
    run(Command::new(&ws.cargo)
        .current_dir(&ws.root)
        .args([
            "bench", "--locked", "-p", "syncd", "--bench", "queue", "--bench", "reload", "--bench",
            "e2e",
        ])
        .arg("--")
        .args(extra))
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
    plugins::build(ws)?;
    run(Command::new(&ws.cargo)
        .current_dir(&ws.root)
        .args(["test", "--workspace", "--locked"])
        .args(extra))
}
