//! `syncd`: the command line.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use syncd::config::Config;
use syncd::plugin::{PluginContext, PluginEngine};
use syncd::queue::Queue;

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
    /// Queue readings from a JSON-lines file ("-" for standard input), all or none,
    /// then ask a running daemon to sync.
    Enqueue {
        /// The file: one JSON reading per line.
        file: PathBuf,
    },
    /// Create or upgrade the queue's schema, then exit.
    Migrate,
    /// Check configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Check plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
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
        Command::Enqueue { file } => enqueue(&cli.config, &file).await,
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
    }
}

async fn enqueue(config_path: &Path, file: &Path) -> Result<()> {
    let config = Config::load(config_path)?;
    let readings = if file == Path::new("-") {
        syncd::reading::parse_json_lines(std::io::stdin().lock())
    } else {
        let f =
            std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        syncd::reading::parse_json_lines(BufReader::new(f))
    }
    .with_context(|| format!("{}: nothing was queued", file.display()))?;
    let queue = Queue::open_for(&config).await?;
    let count = queue.enqueue(&readings).await?;
    println!("queued {count} readings");
    if nudge_daemon(&config).await {
        println!("asked the running daemon to sync now");
    }
    Ok(())
}

/// Asks a daemon listening on `[api] listen` to sync now; false if none answers.
async fn nudge_daemon(config: &Config) -> bool {
    let url = format!("http://{}/v1/sync", config.api.listen);
    let Ok(client) = syncd::daemon::http_client() else {
        return false;
    };
    client
        .post(url)
        .timeout(Duration::from_secs(2))
        .send()
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
    let as_encoder = engine.load_encoder(file, Arc::clone(&context)).await;
    let (world, info) = match as_encoder {
        Ok(plugin) => ("encoder", plugin.info().clone()),
        Err(encoder_error) => match engine.load_transport(file, context).await {
            Ok(plugin) => ("transport", plugin.info().clone()),
            Err(transport_error) => {
                anyhow::bail!(
                    "{} is refused by this host.\n  as an encoder: {encoder_error:#}\n  as a transport: {transport_error:#}",
                    file.display()
                );
            }
        },
    };
    println!("{}: accepted", file.display());
    println!("  world:       sync:plugin/{world}");
    println!("  name:        {}", info.name);
    println!("  version:     {}", info.version);
    println!("  wit version: {}", info.wit_version);
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
