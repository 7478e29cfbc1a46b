//! `cargo xtask demo`: the quick start. Builds the plugins and binaries, starts the
//! reference Client System and syncd with `sync.toml`, enqueues sample readings,
//! shows them arriving, and stops everything it started.
//!
//! The demo keeps its own data under `target/demo/` (syncd's queue through
//! `SYNCD_DATABASE_URL`, and the Client System's store), so it never touches a queue
//! that `sync.toml` points at, and every run starts from nothing.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Workspace;
use crate::run as run_command;

const CLIENT_SYSTEM: &str = "127.0.0.1:8080";
const SYNCD_API: &str = "127.0.0.1:7878";
const API_KEY: &str = "demo-key";
const READINGS: usize = 5_000;
const ARRIVAL_LIMIT: Duration = Duration::from_secs(120);

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
struct Running {
    name: &'static str,
    child: Child,
}

impl Running {
    fn stop(mut self) -> Result<()> {
        terminate(&mut self.child)?;
        let status = self.child.wait()?;
        println!("demo: {} stopped ({status})", self.name);
        Ok(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = terminate(&mut self.child);
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn terminate(child: &mut Child) -> Result<()> {
    run_command(Command::new("kill").args(["-TERM", &child.id().to_string()]))
}

pub fn run(ws: &Workspace) -> Result<()> {
    crate::plugins::build(ws)?;
    run_command(Command::new(&ws.cargo).current_dir(&ws.root).args([
        "build",
        "--locked",
        "--bin",
        "syncd",
        "--bin",
        "client-system",
    ]))?;
    let bin = ws.target.join("debug");

    let demo = ws.target.join("demo");
    if demo.exists() {
        std::fs::remove_dir_all(&demo)?;
    }
    std::fs::create_dir_all(&demo)?;
    let database_url = format!("sqlite://{}", demo.join("syncd.db").display());
    let config = ws.root.join("sync.toml");

    for (what, addr) in [
        ("the reference Client System", CLIENT_SYSTEM),
        ("syncd's API", SYNCD_API),
    ] {
        if TcpStream::connect(addr).is_ok() {
            bail!(
                "{addr} is already in use, and the demo needs it for {what}: stop what listens there"
            );
        }
    }

    let client = Running {
        name: "client-system",
        child: Command::new(bin.join("client-system"))
            .args([
                "--listen",
                CLIENT_SYSTEM,
                "--api-key",
                API_KEY,
                "--database",
            ])
            .arg(demo.join("client-system.db"))
            .spawn()
            .context("failed to start client-system")?,
    };
    wait_for(CLIENT_SYSTEM, "/api/health")?;
    println!("demo: reference Client System listening on http://{CLIENT_SYSTEM}/api");

    let syncd = Running {
        name: "syncd",
        child: Command::new(bin.join("syncd"))
            .arg("--config")
            .arg(&config)
            .arg("run")
            .env("CLIENT_API_KEY", API_KEY)
            .env("SYNCD_DATABASE_URL", &database_url)
            .spawn()
            .context("failed to start syncd")?,
    };
    wait_for(SYNCD_API, "/healthz")?;
    println!("demo: syncd running with {}", config.display());

    let readings = demo.join("readings.jsonl");
    write_sample(&readings)?;
    run_command(
        Command::new(bin.join("syncd"))
            .arg("--config")
            .arg(&config)
            .arg("enqueue")
            .arg(&readings)
            .env("CLIENT_API_KEY", API_KEY)
            .env("SYNCD_DATABASE_URL", &database_url),
    )?;

    let started = Instant::now();
    let mut shown = u64::MAX;
    let received = loop {
        let received = received_readings()?;
        if received != shown {
            println!("demo: the Client System has received {received} of {READINGS} readings");
            shown = received;
        }
        if received >= READINGS as u64 || started.elapsed() > ARRIVAL_LIMIT {
            break received;
        }
        std::thread::sleep(Duration::from_millis(200));
    };

    syncd.stop()?;
    client.stop()?;
    println!(
        "\nThe Client System received {received} readings ({READINGS} enqueued) in {:.1} s.",
        started.elapsed().as_secs_f64()
    );
    if received != READINGS as u64 {
        bail!("{received} readings arrived, {READINGS} were enqueued");
    }
    Ok(())
}

/// Electricity, water and gas meters, one reading each per quarter hour.
fn write_sample(path: &Path) -> Result<()> {
    let kinds = [
        ("elec", "import-kwh", "kWh"),
        ("water", "volume", "m3"),
        ("gas", "volume", "m3"),
    ];
    let start_ms: i64 = 1_795_305_600_000; // 2026-11-22T00:00:00Z
    let mut out = String::with_capacity(READINGS * 120);
    for i in 0..READINGS {
        let meter = i % 50;
        let (kind, channel, unit) = kinds[meter % 3];
        let step = (i / 50) as i64;
        let value = 1000.0 + step as f64 * 0.25 + meter as f64;
        out.push_str(&format!(
            "{{\"meter_id\":\"{kind}-{meter:03}\",\"channel\":\"{channel}\",\"timestamp\":{},\"value\":{value},\"unit\":\"{unit}\",\"quality\":\"good\"}}\n",
            start_ms + step * 900_000
        ));
    }
    std::fs::write(path, out).with_context(|| format!("failed to write {}", path.display()))
}

fn received_readings() -> Result<u64> {
    let body = http_get(CLIENT_SYSTEM, "/admin/stats")?;
    let field = "\"readings\":";
    let at = body.find(field).context("stats without a readings count")? + field.len();
    let digits: String = body[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Ok(digits.parse()?)
}

fn wait_for(addr: &str, path: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if http_get(addr, path).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing answered on http://{addr}{path} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A minimal HTTP/1.1 GET: the body of a 200 answer.
fn http_get(addr: &str, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    if !response.starts_with("HTTP/1.1 200") {
        bail!(
            "GET {path}: {}",
            response.lines().next().unwrap_or("no answer")
        );
    }
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    Ok(body.to_owned())
}
