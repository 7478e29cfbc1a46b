//! `syncd`: the command line.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use syncd::config::Config;
use syncd::plugin::{PluginContext, PluginEngine};
use syncd::queue::Queue;
use syncd::reading::FileFormat;

/// Store-and-forward sync daemon: queues meter readings locally and delivers them in
/// batches to Client Systems, through WebAssembly encoder and transport plugins.
#[derive(Parser)]
#[command(name = "syncd", version, about, long_about = None)]
struct Cli {
    /// The site's configuration file.
    #[arg(
        long,
        short,
        global = true,
        env = "SYNCD_CONFIG",
        default_value = "sync.toml"
    )]
    config: PathBuf,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Plain)]
    log_format: LogFormat,
    /// Log level or filter (e.g. "debug", "syncd=debug,info"); RUST_LOG also works.
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: deliver queued readings until stopped (Ctrl-C or SIGTERM).
    Run,
    /// Queue readings from a file ("-" for standard input), all or none, then ask a
    /// running daemon to sync. Large files are streamed.
    Enqueue {
        /// The file: JSON lines (one reading per line) or CSV with a header row.
        file: PathBuf,
        /// The file's format; by default CSV for a name ending in .csv, else JSON lines.
        #[arg(long, value_enum, default_value_t = InputFormat::Auto)]
        format: InputFormat,
    },
    /// List, requeue or purge dead letters: batches that will not be retried by
    /// themselves.
    DeadLetter {
        #[command(subcommand)]
        command: DeadLetterCommand,
    },
    /// What the running daemon is doing, per Client System.
    Status {
        /// Print the daemon's JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Refresh every N seconds in place until Ctrl-C (default 2 when given
        /// without a number).
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<u64>,
    },
    /// Ask the running daemon to reload sync.toml and the plugins now (it also
    /// reloads by itself when they change, and on SIGHUP). Exits 1 if anything was
    /// refused; what was running then stays.
    Reload,
    /// Ask the running daemon to sync now, every Client System or the one named.
    Sync {
        /// The Client System.
        #[arg(long)]
        client: Option<String>,
    },
    /// Delivery statistics per Client System, from the sync log.
    Stats {
        /// The period, in hours back from now.
        #[arg(long, default_value_t = 24.0)]
        hours: f64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Create or upgrade the queue's schema, then exit.
    Migrate,
    /// Check configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Write, check and try plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum InputFormat {
    Auto,
    Jsonl,
    Csv,
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// List dead letters, oldest first.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back in the queue, to be sent again (same batch ids, fresh
    /// retries).
    Requeue {
        /// The batch id of the dead letter.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
    /// Delete dead letters, and their readings once no Client System needs them.
    Purge {
        /// The batch id of the dead letter.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration without running it (default: --config).
    Check {
        /// The file to check.
        file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Load a component and say what it is and whether this host accepts it.
    Check {
        /// The component (.wasm).
        file: PathBuf,
    },
    /// Run a plugin outside any site and print what every export produced and what
    /// the host would do with it: an encoder over sample readings (or a file's), a
    /// transport against a Client System. Exits 1 if any call failed.
    Test {
        /// The component (.wasm).
        file: PathBuf,
        /// Readings to use: JSON lines, or CSV for a name ending in .csv (the formats
        /// of `syncd enqueue`). By default, generated samples.
        #[arg(long, value_name = "FILE")]
        readings: Option<PathBuf>,
        /// How many sample readings to generate.
        #[arg(long, default_value_t = 4)]
        count: usize,
        /// The Client System a transport talks to: its base_url.
        #[arg(long)]
        url: Option<String>,
        /// The API key a transport gets as the secret "api-key".
        #[arg(long, env = "SYNCD_PLUGIN_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// A plugin setting, as in `[client_system.plugin]` (repeat for more).
        #[arg(long = "setting", value_name = "KEY=VALUE", value_parser = parse_setting)]
        settings: Vec<(String, String)>,
        /// For a transport: upload what this encoder makes of the readings (by
        /// default the batch as the json_batch encoder writes it).
        #[arg(long, value_name = "FILE")]
        encoder: Option<PathBuf>,
        /// Take the base_url, api_key and plugin settings of this Client System of
        /// --config (and its site id and plugin cache); the options above override them.
        #[arg(long, value_name = "NAME")]
        client_system: Option<String>,
        /// Keep compiled components in this folder, as `[plugins] cache_dir` does: a
        /// large component (JavaScript, Python) then compiles once.
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// How much of an encoded body to print, in bytes.
        #[arg(long, default_value_t = 4096)]
        show_bytes: usize,
    },
    /// Write a new plugin crate, ready to build, test and change: NAME/ in the
    /// current folder (or --dir).
    New {
        /// The crate's name: lower-case letters, digits, '_' and '-'.
        name: String,
        /// Which kind of plugin.
        #[arg(long, value_enum)]
        world: syncd::plugin::kit::NewWorld,
        /// Where to create the crate's folder.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

/// `KEY=VALUE`.
fn parse_setting(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, cli.log_level.as_deref());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("syncd: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // Output piped into a program that stopped reading (`| head`): done.
        Err(error)
            if error.chain().any(|cause| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("syncd: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run => {
            let config = Config::load(&cli.config)?;
            syncd::daemon::run(config, syncd::daemon::shutdown_signal()).await
        }
        Command::Enqueue { file, format } => enqueue(&cli.config, &file, format).await,
        Command::DeadLetter { command } => dead_letter(&cli.config, command).await,
        Command::Stats { hours, json } => stats(&cli.config, hours, json).await,
        Command::Sync { client } => sync_now(&cli.config, client.as_deref()).await,
        Command::Reload => reload(&cli.config).await,
        Command::Status { json, watch } => match watch {
            None => status(&cli.config, json).await,
            Some(seconds) => loop {
                // Home, then clear: the new table replaces the old in place.
                print!("\x1b[H\x1b[2J");
                status(&cli.config, json).await?;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(seconds.max(1))) => {}
                    _ = tokio::signal::ctrl_c() => break Ok(()),
                }
            },
        },
        Command::Migrate => {
            let config = Config::load(&cli.config)?;
            Queue::open(
                &config.database.url,
                config.database.durability,
                &config.base_dir,
            )
            .await?;
            println!("the queue's schema is up to date");
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Check { file },
        } => {
            let path = file.unwrap_or(cli.config);
            let config = Config::load(&path)?;
            println!(
                "{}: valid; site {}, {} client system(s)",
                path.display(),
                config.site.id,
                config.client_systems.len()
            );
            Ok(())
        }
        Command::Plugin {
            command: PluginCommand::Check { file },
        } => plugin_check(&file).await,
        Command::Plugin {
            command:
                PluginCommand::Test {
                    file,
                    readings,
                    count,
                    url,
                    api_key,
                    settings,
                    encoder,
                    client_system,
                    cache_dir,
                    show_bytes,
                },
        } => {
            let mut options = syncd::plugin::kit::TestOptions {
                file,
                readings,
                count,
                url,
                api_key: api_key.map(syncd::config::Secret::new),
                settings: Default::default(),
                encoder,
                site_id: syncd::plugin::kit::TEST_SITE.to_owned(),
                client_system: syncd::plugin::kit::TEST_SITE.to_owned(),
                request_timeout: Duration::from_secs(10),
                cache_dir,
                show_bytes,
            };
            if let Some(name) = client_system {
                let config = Config::load(&cli.config)?;
                let cs = config
                    .client_systems
                    .iter()
                    .find(|cs| cs.name == name)
                    .with_context(|| {
                        format!(
                            "{} has no client system named {name:?}",
                            cli.config.display()
                        )
                    })?;
                options.url = options.url.or_else(|| Some(cs.base_url.clone()));
                options.api_key = options.api_key.or_else(|| cs.api_key.clone());
                options.settings = cs.plugin_settings();
                options.site_id = config.site.id.clone();
                options.client_system = cs.name.clone();
                options.request_timeout = cs.policy(&config.defaults).request_timeout;
                options.cache_dir = options.cache_dir.or_else(|| config.plugin_cache_dir());
            }
            options.settings.extend(settings);
            let passed = syncd::plugin::kit::test(&options, &mut std::io::stdout().lock()).await?;
            if !passed {
                anyhow::bail!("the plugin failed some of its calls");
            }
            Ok(())
        }
        Command::Plugin {
            command: PluginCommand::New { name, world, dir },
        } => {
            let dir = syncd::plugin::kit::new_plugin(&name, world, &dir)?;
            println!("created {}", dir.display());
            println!("next: read its README.md; the walkthrough is in syncd's docs/plugins.md");
            Ok(())
        }
    }
}

/// Readings per insert while streaming a file.
const ENQUEUE_CHUNK: usize = 10_000;

async fn enqueue(config_path: &Path, file: &Path, format: InputFormat) -> Result<()> {
    let config = Config::load(config_path)?;
    let format = match format {
        InputFormat::Jsonl => FileFormat::JsonLines,
        InputFormat::Csv => FileFormat::Csv,
        InputFormat::Auto
            if file
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("csv")) =>
        {
            FileFormat::Csv
        }
        InputFormat::Auto => FileFormat::JsonLines,
    };
    let input: Box<dyn BufRead> = if file == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        let f =
            std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        Box::new(BufReader::new(f))
    };
    let queue = Queue::open_for(&config).await?;
    let show_progress = std::io::stderr().is_terminal();
    let result: Result<u64> = async {
        let mut ingest = queue.ingest().await?;
        let mut chunk = Vec::with_capacity(ENQUEUE_CHUNK);
        let mut read = 0u64;
        for reading in syncd::reading::read_records(input, format) {
            chunk.push(reading?);
            if chunk.len() == ENQUEUE_CHUNK {
                ingest.add(&chunk).await?;
                read += chunk.len() as u64;
                chunk.clear();
                if show_progress {
                    eprint!("\rread {read} readings…");
                }
            }
        }
        ingest.add(&chunk).await?;
        ingest.commit().await
    }
    .await;
    if show_progress {
        eprint!("\r\x1b[K");
    }
    let count = result.with_context(|| format!("{}: nothing was queued", file.display()))?;
    println!("queued {count} readings");
    if nudge_daemon(&config).await {
        println!("asked the running daemon to sync now");
    }
    Ok(())
}

async fn dead_letter(config_path: &Path, command: DeadLetterCommand) -> Result<()> {
    let config = Config::load(config_path)?;
    let queue = Queue::open_for(&config).await?;
    match command {
        DeadLetterCommand::List { json } => {
            let dead = queue.dead_letters().await?;
            if json {
                let rows: Vec<_> = dead
                    .iter()
                    .map(|d| {
                        serde_json::json!({
                            "id": d.id,
                            "client_system": d.client_system,
                            "readings": d.reading_count,
                            "first_reading_id": d.first_reading_id,
                            "last_reading_id": d.last_reading_id,
                            "attempts": d.attempts,
                            "reason": d.reason,
                            "dead_at_ms": d.dead_at_ms,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if dead.is_empty() {
                println!("no dead letters");
            } else {
                println!(
                    "{:<36}  {:<16}  {:>8}  {:>8}  {:<20}  reason",
                    "batch id", "client system", "readings", "attempts", "dead since (UTC)"
                );
                for d in &dead {
                    println!(
                        "{:<36}  {:<16}  {:>8}  {:>8}  {:<20}  {}",
                        d.id,
                        d.client_system,
                        d.reading_count,
                        d.attempts,
                        format_ms(d.dead_at_ms),
                        d.reason
                    );
                }
            }
        }
        DeadLetterCommand::Requeue { id, .. } => {
            let count = queue.requeue_dead_letters(id.as_deref()).await?;
            if let (Some(id), 0) = (&id, count) {
                anyhow::bail!("no dead letter with batch id {id}");
            }
            println!("requeued {count} dead letter(s)");
            if nudge_daemon(&config).await {
                println!("asked the running daemon to sync now");
            }
        }
        DeadLetterCommand::Purge { id, .. } => {
            let count = queue.purge_dead_letters(id.as_deref()).await?;
            if let (Some(id), 0) = (&id, count) {
                anyhow::bail!("no dead letter with batch id {id}");
            }
            println!("purged {count} dead letter(s)");
        }
    }
    Ok(())
}

async fn stats(config_path: &Path, hours: f64, json: bool) -> Result<()> {
    anyhow::ensure!(
        hours.is_finite() && hours > 0.0,
        "--hours must be a positive number"
    );
    let config = Config::load(config_path)?;
    let queue = Queue::open_for(&config).await?;
    let since = syncd::clock::now_ms() - (hours * 3_600_000.0) as i64;
    let stats = queue.stats_since(since).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "hours": hours, "client_systems": stats })
            )?
        );
        return Ok(());
    }
    println!("last {hours} hours");
    println!(
        "{:<16}  {:>8}  {:>8}  {:>10}  {:>7}  {:>11}  {:>8}  {:>8}  last success (UTC)",
        "client system",
        "attempts",
        "batches",
        "readings",
        "retries",
        "unreachable",
        "rejected",
        "mean ms"
    );
    for s in &stats {
        println!(
            "{:<16}  {:>8}  {:>8}  {:>10}  {:>7}  {:>11}  {:>8}  {:>8.1}  {}",
            s.client_system,
            s.attempts,
            s.batches_delivered,
            s.readings_delivered,
            s.retries,
            s.unreachable,
            s.rejected,
            s.mean_attempt_ms,
            s.last_success_ms
                .map(format_ms)
                .unwrap_or_else(|| "never".into())
        );
    }
    if stats.is_empty() {
        println!("(no attempts in this period)");
    }
    Ok(())
}

/// Milliseconds since the Unix epoch as an RFC 3339 time, to the second.
fn format_ms(ms: i64) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(time).to_string()
}

async fn status(config_path: &Path, json: bool) -> Result<()> {
    let config = Config::load(config_path)?;
    let response = call_daemon(&config, reqwest::Method::GET, "/v1/status", &[], 5).await?;
    let body: serde_json::Value = response
        .json()
        .await
        .context("the daemon's answer is not JSON")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let time = |v: &serde_json::Value| v.as_i64().map(format_ms).unwrap_or_else(|| "-".into());
    println!(
        "site {} (syncd {})",
        body["site_id"].as_str().unwrap_or("?"),
        body["daemon_version"].as_str().unwrap_or("?")
    );
    let config = &body["config"];
    println!(
        "config {} loaded {}, {} reloads ({} refused)",
        config["path"].as_str().unwrap_or("?"),
        time(&config["loaded_at_ms"]),
        config["reloads"].as_u64().unwrap_or(0),
        config["reload_failures"].as_u64().unwrap_or(0),
    );
    if let Some(error) = config["last_error"].as_str() {
        println!("last reload refused: {error}");
    }
    for key in config["restart_needed"].as_array().into_iter().flatten() {
        println!("changed, needs a restart: {}", key.as_str().unwrap_or("?"));
    }
    let all: Vec<&serde_json::Value> = body["client_systems"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let in_state = |state: &str| {
        all.iter()
            .filter(|cs| cs["connectivity"]["state"] == state)
            .count()
    };
    println!(
        "totals: {} client systems ({} online, {} offline), {} deliveries pending, {} batches in flight",
        all.len(),
        in_state("online"),
        in_state("offline"),
        all.iter()
            .filter_map(|cs| cs["queued"].as_u64())
            .sum::<u64>(),
        all.iter().filter(|cs| cs["in_flight"].is_string()).count(),
    );
    for cs in body["client_systems"].as_array().into_iter().flatten() {
        let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
        let plugin = |p: &serde_json::Value| {
            let health = match p["failures_in_a_row"].as_u64().unwrap_or(0) {
                0 => String::new(),
                n => format!(
                    "; {}, {n} failures in a row, last: {}",
                    text(&p["health"]).to_uppercase(),
                    text(&p["last_failure"])
                ),
            };
            format!(
                "{} {} (sha256 {}, {} {}){health}",
                text(&p["name"]),
                text(&p["version"]),
                p["sha256"].as_str().map_or("-", |h| &h[..h.len().min(12)]),
                text(&p["origin"]),
                time(&p["loaded_at_ms"]),
            )
        };
        let with_time = |what: String, at: &serde_json::Value| match at.as_i64() {
            Some(ms) => format!("{what} (at {})", format_ms(ms)),
            None => what,
        };
        let retry = &cs["retry"];
        let next_retry = match retry["next_attempt_ms"].as_i64() {
            Some(ms) => format!(
                "{} (batch {}, {} of {} attempts used)",
                format_ms(ms),
                text(&retry["batch_id"]),
                retry["attempts"],
                cs["settings"]["max_retries"].as_u64().map_or(0, |n| n + 1)
            ),
            None => "-".into(),
        };
        let remote = &cs["remote_config"];
        let remote_config = match remote["version"].as_str() {
            Some(version) => format!(
                "version {version}, {} {}, sets {}",
                text(&remote["source"]),
                time(&remote["fetched_at_ms"]),
                remote["keys"]
                    .as_array()
                    .map(|keys| keys
                        .iter()
                        .filter_map(|k| k.as_str())
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_default()
            ),
            None => "none".into(),
        };
        let link = &cs["connectivity"];
        let connectivity = format!(
            "{} since {}, {} failures in a row, last check {}",
            text(&link["state"]),
            time(&link["since_ms"]),
            link["consecutive_failures"].as_u64().unwrap_or(0),
            time(&link["last_check_ms"]),
        );
        let outages = format!(
            "{} (up {}, down {}; last failure: {})",
            link["outages"].as_u64().unwrap_or(0),
            format_duration(&link["uptime_ms"]),
            format_duration(&link["downtime_ms"]),
            text(&link["last_failure"]),
        );
        println!();
        println!("{}", text(&cs["client_system"]));
        let rows = [
            ("connectivity", connectivity),
            ("outages", outages),
            ("queued", cs["queued"].as_u64().unwrap_or(0).to_string()),
            ("in flight", text(&cs["in_flight"])),
            ("last success", time(&cs["last_success_ms"])),
            (
                "last error",
                with_time(text(&cs["last_error"]), &cs["last_error_ms"]),
            ),
            ("next retry", next_retry),
            ("authentication", text(&cs["authentication"])),
            ("last heartbeat", time(&cs["last_heartbeat_ms"])),
            ("remote config", remote_config),
            ("remote config error", text(&cs["remote_config_error"])),
            ("encoder", plugin(&cs["encoder"])),
            ("transport", plugin(&cs["transport"])),
            ("reload error", text(&cs["reload_error"])),
        ];
        for (label, value) in rows {
            println!("  {label:<20} {value}");
        }
    }
    let processes: Vec<&serde_json::Value> =
        body["processes"].as_array().into_iter().flatten().collect();
    if processes.len() > 1 || processes.iter().any(|p| p["this"] != true) {
        println!();
        println!("processes sharing the queue");
        for p in processes {
            let batches: Vec<String> = p["batches"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| {
                    format!(
                        "{} {} (lease until {})",
                        b["client_system"].as_str().unwrap_or("?"),
                        b["batch_id"].as_str().unwrap_or("?"),
                        time(&b["lease_until_ms"])
                    )
                })
                .collect();
            println!(
                "  {:<20} {}pid {} on {}, syncd {}, started {}, last seen {}; holds {}",
                p["name"].as_str().unwrap_or("?"),
                if p["this"] == true { "(this) " } else { "" },
                p["pid"],
                p["host"].as_str().unwrap_or("?"),
                p["version"].as_str().unwrap_or("?"),
                time(&p["started_at_ms"]),
                time(&p["last_seen_ms"]),
                if batches.is_empty() {
                    "no batch".to_owned()
                } else {
                    batches.join(", ")
                }
            );
        }
    }
    Ok(())
}

/// A number of milliseconds as a rounded duration, e.g. "3h 12m 5s".
fn format_duration(ms: &serde_json::Value) -> String {
    let seconds = ms.as_i64().unwrap_or(0).max(0) / 1000;
    humantime::format_duration(Duration::from_secs(seconds as u64)).to_string()
}

/// Asks the daemon listening on `[api] listen` to sync now (`client`, or all).
async fn request_sync(config: &Config, client: Option<&str>) -> Result<reqwest::Response> {
    let query: Vec<(&str, &str)> = client.map(|name| ("client", name)).into_iter().collect();
    call_daemon(config, reqwest::Method::POST, "/v1/sync", &query, 5).await
}

/// Calls the running daemon's API on `[api] listen`, with `[api] token` if set.
async fn call_daemon(
    config: &Config,
    method: reqwest::Method,
    path: &str,
    query: &[(&str, &str)],
    timeout_secs: u64,
) -> Result<reqwest::Response> {
    let mut url = reqwest::Url::parse(&format!("http://{}{path}", config.api.listen))?;
    if !query.is_empty() {
        url.query_pairs_mut().extend_pairs(query);
    }
    let mut request = syncd::daemon::http_client()?
        .request(method, url)
        .timeout(Duration::from_secs(timeout_secs));
    if let Some(token) = &config.api.token {
        request = request.bearer_auth(token.expose());
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("no daemon answers on {} ([api] listen)", config.api.listen))?;
    if response.status() == reqwest::StatusCode::UNAUTHORIZED {
        anyhow::bail!(
            "the daemon on {} refused the API token: [api] token must match the daemon's",
            config.api.listen
        );
    }
    Ok(response)
}

async fn sync_now(config_path: &Path, client: Option<&str>) -> Result<()> {
    let config = Config::load(config_path)?;
    let response = request_sync(&config, client).await?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!(
            "the daemon refused: {}",
            body["error"].as_str().unwrap_or(status.as_str())
        );
    }
    let names: Vec<&str> = body["triggered"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    println!("syncing now: {}", names.join(", "));
    Ok(())
}

async fn reload(config_path: &Path) -> Result<()> {
    let config = Config::load(config_path)?;
    let response = call_daemon(&config, reqwest::Method::POST, "/v1/reload", &[], 120).await?;
    let status = response.status();
    let body: serde_json::Value = response
        .json()
        .await
        .context("the daemon's answer is not JSON")?;
    let lines = |key: &str| -> Vec<String> {
        body[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    for change in lines("changes") {
        println!("changed: {change}");
    }
    for key in lines("restart_needed") {
        println!("needs a restart: {key}");
    }
    if status.is_success() {
        if lines("changes").is_empty() {
            println!("nothing changed");
        }
        return Ok(());
    }
    anyhow::bail!(
        "reload refused: {}",
        body["error"].as_str().unwrap_or(status.as_str())
    )
}

/// Asks a daemon listening on `[api] listen` to sync now; false if none answers.
async fn nudge_daemon(config: &Config) -> bool {
    request_sync(config, None)
        .await
        .is_ok_and(|r| r.status().is_success())
}

async fn plugin_check(file: &Path) -> Result<()> {
    let engine = PluginEngine::new()?;
    let context = Arc::new(PluginContext::new(
        "plugin-check",
        "plugin-check",
        "http://127.0.0.1/",
        Default::default(),
        None,
        Duration::from_secs(5),
        syncd::daemon::http_client()?,
    )?);
    let loaded = engine.load_any(file, context).await?;
    let (world, info) = (loaded.plugin.world(), loaded.plugin.info());
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}: accepted", file.display())?;
    writeln!(out, "  world:       sync:plugin/{world}")?;
    writeln!(out, "  name:        {}", info.name)?;
    writeln!(out, "  version:     {}", info.version)?;
    writeln!(out, "  wit version: {}", info.wit_version)?;
    let bytes = std::fs::read(file)?;
    writeln!(
        out,
        "  sha256:      {}",
        syncd::plugin::cache::sha256_hex(&bytes)
    )?;
    writeln!(out, "  imports:     {}", loaded.imports.join(", "))?;
    writeln!(out, "  exports:     {}", loaded.exports.join(", "))?;
    Ok(())
}

/// Info from syncd, warnings from its libraries (the migrator is chatty at info).
const DEFAULT_LOG_FILTER: &str = "info,sea_orm_migration=warn,sqlx=warn";

fn init_logging(format: LogFormat, level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(level) => EnvFilter::new(level),
        None => {
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER))
        }
    };
    // Colours only for a terminal: a log file or journald gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
