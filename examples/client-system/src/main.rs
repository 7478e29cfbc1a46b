//! `client-system`: runs the reference Client System until Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use client_system::{Options, Server};

/// The reference Client System (MeterIt API) that syncd delivers to.
#[derive(Parser)]
#[command(name = "client-system", version, about)]
struct Cli {
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The SQLite file accepted readings are stored in.
    #[arg(long, default_value = "data/client-system.db")]
    database: PathBuf,
    /// The API key it accepts.
    #[arg(long, env = "CLIENT_API_KEY", default_value = "demo-key")]
    api_key: String,
    /// Acknowledge a batch without waiting for it to reach the disk: a crash of the
    /// machine may lose the last batches acknowledged. For benchmarking a sender.
    #[arg(long)]
    no_flush: bool,
    /// Store each batch's record (key, site, content type, how many readings it held)
    /// but not its readings. For benchmarking a sender's long runs.
    #[arg(long)]
    batches_only: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let server = Server::start(
        cli.listen,
        Options {
            api_key: cli.api_key,
            database: cli.database,
            flush_each_batch: !cli.no_flush,
            store_readings: !cli.batches_only,
        },
    )
    .await?;
    eprintln!("client-system: listening on {}", server.base_url());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    server.stop().await;
    Ok(())
}
