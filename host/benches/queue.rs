//! Queue benchmark (`cargo xtask bench`): ingest through the local API, and backlog
//! drain through both real plugins to the reference Client System on loopback, with a
//! small and a large backlog. Prints a table and writes `target/bench/queue.json`.
//! The small backlog (10,000) is queued and drained again and again at one site, up to
//! as many readings in all as the large one holds (at most a million): the same
//! readings, ids and Client System on both sides, only how many wait at once differs.
//!
//! Arguments: `--large N` (default 1000000) readings for the large backlog;
//! `--postgres URL` to run on that PostgreSQL database instead of SQLite.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use client_system::Server;
use syncd::config::Config;
use syncd::queue::Queue;
use syncd::queue::entities::sync_log as syncd_log;
use syncd::reading::NewReading;

const INGEST_REQUESTS: usize = 200;
const READINGS_PER_REQUEST: usize = 1000;
const SMALL_BACKLOG: usize = 10_000;
/// Most drains of the small backlog in a run (see `main`).
const MAX_SMALL_RUNS: usize = 100;

mod common;
use common::{
    batch_counting_client_system, client_system, plugin, post_all, reading, request_body,
    wait_for_api, write_site,
};

struct Bench {
    dir: tempfile::TempDir,
    client: Server,
    database_url: String,
}

impl Bench {
    async fn new(postgres: Option<&str>) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let client = client_system(dir.path(), "shared").await?;
        let database_url = match postgres {
            Some(url) => url.to_owned(),
            None => "sqlite://syncd.db".to_owned(),
        };
        Ok(Self {
            dir,
            client,
            database_url,
        })
    }

    /// A fresh site: a new SQLite file (or emptied PostgreSQL tables).
    async fn site(&self, name: &str) -> Result<Config> {
        self.site_for(name, &self.client.base_url()).await
    }

    /// A Client System of its own, storing into a new file the record of each batch
    /// but not its readings: what a batch costs it stays the same through a drain of
    /// any length, so that the drain's figures are syncd's.
    async fn fresh_client(&self, name: &str) -> Result<Server> {
        batch_counting_client_system(self.dir.path(), name).await
    }

    async fn site_for(&self, name: &str, base_url: &str) -> Result<Config> {
        let url = if self.database_url.starts_with("sqlite") {
            format!("sqlite://{name}.db")
        } else {
            self.database_url.clone()
        };
        let config = write_site(
            &self.dir.path().join(format!("{name}.toml")),
            &url,
            base_url,
            &plugin("json_batch"),
            "interval = \"1h\"\nbatch_size = 1000",
        )?;
        if !url.starts_with("sqlite") {
            empty_tables(&config).await?;
        }
        Ok(config)
    }
}

async fn empty_tables(config: &Config) -> Result<()> {
    use sea_orm::ConnectionTrait;
    Queue::open_for(config).await?;
    let db = sea_orm::Database::connect(&config.database.url).await?;
    db.execute_unprepared(
        "TRUNCATE readings, batches, dead_letters, sync_log, client_systems RESTART IDENTITY",
    )
    .await?;
    Ok(())
}

/// Readings/s of `POST /v1/readings`, two clients at a time.
async fn ingest(bench: &Bench) -> Result<f64> {
    let config = bench.site("ingest").await?;
    let url = format!("http://{}/v1/readings", config.api.listen);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut daemon = tokio::spawn(syncd::daemon::run(config.clone(), async move {
        let _ = stopped.await;
    }));
    wait_for_api(config.api.listen, &mut daemon).await?;
    let bodies: Vec<Vec<u8>> = (0..INGEST_REQUESTS)
        .map(|r| request_body(r * READINGS_PER_REQUEST, READINGS_PER_REQUEST))
        .collect();
    let started = Instant::now();
    post_all(&url, &bodies).await?;
    let elapsed = started.elapsed();
    let _ = stop.send(());
    daemon.await??;
    Ok((INGEST_REQUESTS * READINGS_PER_REQUEST) as f64 / elapsed.as_secs_f64())
}

/// Readings/s of draining a backlog of `n` readings to the Client System, timed by the
/// sync log from the end of the first attempt to the end of the last: the first attempt
/// carries the warm-up (instantiating the plugins, the transport's authentication),
/// which would otherwise weigh on a small backlog far more than on a large one.
/// What one drain measured.
struct Drain {
    /// Readings delivered after the first attempt, and the ms they took.
    measured: usize,
    span_ms: i64,
    /// Readings/s over the first and the last [`WINDOW`] batches: with the backlog at
    /// its largest, and nearly empty. Their ratio answers, within one run, whether
    /// draining slows down with the size of the backlog.
    head_and_tail: Option<(f64, f64)>,
    /// Where the time of the first and the last window went.
    head_split: Split,
    tail_split: Split,
    /// The same over every batch after the first, for comparing small drains (added
    /// together) with the large one.
    whole_split: Split,
    /// Each batch's cycle after the first, in ms: from the end of the attempt before to
    /// the end of its own (the time between attempts, syncd's database work, and the
    /// attempt itself).
    cycles: Vec<i64>,
}

impl Drain {
    /// Readings/s over the whole drain (after the first attempt).
    fn rate(&self) -> f64 {
        rate(self.measured, self.span_ms)
    }

    /// Mean ms per batch in each tenth of the drain, first to last: a drain that slowed
    /// down with the size of the backlog would show it as a trend here.
    fn tenths(&self) -> Vec<f64> {
        let tenth = self.cycles.len() / 10;
        if tenth == 0 {
            return Vec::new();
        }
        self.cycles
            .chunks_exact(tenth)
            .take(10)
            .map(|c| c.iter().sum::<i64>() as f64 / c.len() as f64)
            .collect()
    }
}

/// The ms of some batches spent inside their attempts (encode + upload, the Client
/// System included, with the next full batch read ahead alongside) and between
/// attempts (syncd's other database work: acknowledging, claiming, recording).
#[derive(Clone, Copy, Default)]
struct Split {
    inside_ms: i64,
    between_ms: i64,
    batches: usize,
}

impl Split {
    /// Of the attempts `rows`, the one `before` them ending where the first span starts.
    fn of(before: &syncd_log::Model, rows: &[syncd_log::Model]) -> Self {
        let mut prev_end = before.started_at_ms + before.duration_ms;
        let mut split = Self::default();
        for r in rows {
            split.inside_ms += r.duration_ms;
            split.between_ms += r.started_at_ms - prev_end;
            split.batches += 1;
            prev_end = r.started_at_ms + r.duration_ms;
        }
        split
    }

    fn add(self, other: Self) -> Self {
        Self {
            inside_ms: self.inside_ms + other.inside_ms,
            between_ms: self.between_ms + other.between_ms,
            batches: self.batches + other.batches,
        }
    }

    /// Mean ms per batch inside attempts and between them.
    fn per_batch(&self) -> (f64, f64) {
        let n = self.batches.max(1) as f64;
        (self.inside_ms as f64 / n, self.between_ms as f64 / n)
    }
}

/// Readings/s of `readings` delivered in `span_ms`.
fn rate(readings: usize, span_ms: i64) -> f64 {
    readings as f64 / (span_ms.max(1) as f64 / 1000.0)
}

/// Batches per window of [`Drain::head_and_tail`].
const WINDOW: usize = 100;

/// Readings/s over consecutive accepted attempts `rows`, from the end of the one before
/// them to the end of the last.
fn window_rate(before: &syncd_log::Model, rows: &[syncd_log::Model]) -> f64 {
    let last = &rows[rows.len() - 1];
    let span_ms = last.started_at_ms + last.duration_ms - before.started_at_ms - before.duration_ms;
    let readings: i64 = rows.iter().map(|r| i64::from(r.reading_count)).sum();
    rate(readings as usize, span_ms)
}

/// A site whose backlogs are drained: its database and its own Client System, kept
/// from one drain to the next.
struct DrainSite {
    config: Config,
    queue: Queue,
    client: Server,
    /// Readings queued at the site so far (the next one is `reading(queued)`).
    queued: usize,
}

impl Bench {
    /// A new site whose first reading will be `reading(first)`, with id `first + 1`.
    /// On PostgreSQL every site shares the database: a new one empties it, and
    /// `first` is where a site emptied that way starts again.
    async fn drain_site(&self, name: &str, first: usize) -> Result<DrainSite> {
        let client = self.fresh_client(name).await?;
        let config = self.site_for(name, &client.base_url()).await?;
        let queue = Queue::open_for(&config).await?;
        start_ids_after(&config, first).await?;
        Ok(DrainSite {
            config,
            queue,
            client,
            queued: first,
        })
    }
}

/// Queues the next `n` readings at `site` and runs the daemon until it has delivered
/// them all.
async fn drain(site: &mut DrainSite, n: usize) -> Result<Drain> {
    let DrainSite {
        config,
        queue,
        queued: next,
        ..
    } = site;
    let chunk = 10_000;
    let (first, end) = (*next, *next + n);
    let mut queued = first;
    while queued < end {
        let readings: Vec<NewReading> = (queued..(queued + chunk).min(end)).map(reading).collect();
        queue.enqueue(&readings).await?;
        queued += readings.len();
    }
    *next = end;
    settle().await?;
    let since_ms = syncd::clock::now_ms();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(syncd::daemon::run(config.clone(), async move {
        let _ = stopped.await;
    }));
    let limit = Instant::now() + Duration::from_secs(600);
    while queue.has_readings().await? {
        anyhow::ensure!(
            Instant::now() < limit,
            "the backlog did not drain within 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    daemon.await??;
    let log = queue.sync_log_since(since_ms).await?;
    let first = log.first().context("no attempt logged")?;
    let last = log.last().context("no attempt logged")?;
    let delivered: i64 = log
        .iter()
        .filter(|r| r.outcome == "accepted")
        .map(|r| i64::from(r.reading_count))
        .sum();
    anyhow::ensure!(
        delivered as usize == n,
        "{delivered} of {n} readings delivered"
    );
    let warm_from = first.started_at_ms + first.duration_ms;
    let span_ms = last.started_at_ms + last.duration_ms - warm_from;
    let measured = n - first.reading_count as usize;
    let head_and_tail = (log.len() > 2 * WINDOW + 1).then(|| {
        let head = window_rate(&log[0], &log[1..=WINDOW]);
        let tail_start = log.len() - WINDOW;
        let tail = window_rate(&log[tail_start - 1], &log[tail_start..]);
        (head, tail)
    });
    let (head_split, tail_split) = if log.len() > 2 * WINDOW + 1 {
        let tail_start = log.len() - WINDOW;
        (
            Split::of(&log[0], &log[1..=WINDOW]),
            Split::of(&log[tail_start - 1], &log[tail_start..]),
        )
    } else {
        (Split::default(), Split::default())
    };
    let whole_split = Split::of(first, &log[1..]);
    let cycles = log
        .windows(2)
        .map(|w| w[1].started_at_ms + w[1].duration_ms - w[0].started_at_ms - w[0].duration_ms)
        .collect();
    Ok(Drain {
        measured,
        span_ms,
        head_and_tail,
        head_split,
        tail_split,
        whole_split,
        cycles,
    })
}

/// Makes the next reading queued in the PostgreSQL database of `config` get id
/// `last + 1`, as at a site that has queued `last` readings before (see
/// [`Bench::drain_site`]). A SQLite site keeps its own file, and its ids with it.
async fn start_ids_after(config: &Config, last: usize) -> Result<()> {
    use sea_orm::ConnectionTrait;
    if last == 0 {
        return Ok(());
    }
    let url = &config.database.url;
    anyhow::ensure!(
        !url.starts_with("sqlite"),
        "a SQLite site starts from its own file's ids"
    );
    let db = sea_orm::Database::connect(url).await?;
    db.execute_unprepared(&format!(
        "SELECT setval(pg_get_serial_sequence('readings', 'id'), {last})"
    ))
    .await?;
    db.close().await?;
    Ok(())
}

/// Lets the writes of queuing the backlog settle before it is drained: the kernel's
/// dirty pages written out. Queuing a million readings in seconds leaves hundreds of
/// megabytes to write back, which would otherwise compete with the start of the large
/// drain only (a real backlog builds up over hours). SQLite's write-ahead log is left
/// as it is: its checkpoints fall where they fall, into the drains of either size in
/// proportion to what they write.
async fn settle() -> Result<()> {
    let synced = tokio::process::Command::new("sync").status().await?;
    anyhow::ensure!(synced.success(), "sync failed: {synced}");
    Ok(())
}

/// The mean of the middle 80% of `values` (sorted in place): the fastest and the
/// slowest tenth left out. Over many values it is also finer than the milliseconds of
/// each (the sync log's unit).
fn middle_mean(values: &mut [i64]) -> f64 {
    values.sort_unstable();
    let tenth = values.len() / 10;
    let middle = &values[tenth..values.len() - tenth];
    middle.iter().sum::<i64>() as f64 / middle.len().max(1) as f64
}

/// Of `sorted` cycles (ms): the median, the 90th and 99th percentiles, the longest,
/// and the share of all the time taken by the slowest tenth. Where a drain's mean and
/// its middle part differ, this tells whether a few long batches make the difference.
fn spread(sorted: &[i64]) -> ([i64; 4], f64) {
    if sorted.is_empty() {
        // A drain of one batch: no cycle after its first attempt.
        return ([0; 4], 0.0);
    }
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    let total: i64 = sorted.iter().sum();
    let slowest: i64 = sorted[sorted.len() - sorted.len() / 10..].iter().sum();
    (
        [at(0.5), at(0.9), at(0.99), sorted[sorted.len() - 1]],
        slowest as f64 / total.max(1) as f64,
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let large = common::number("--large", 1_000_000)?;
    let postgres = common::argument("--postgres");
    let backend = if postgres.is_some() {
        "postgres"
    } else {
        "sqlite"
    };
    let bench = Bench::new(postgres.as_deref()).await?;

    eprintln!("bench: ingest, {INGEST_REQUESTS} requests of {READINGS_PER_REQUEST} readings…");
    let ingest_rate = ingest(&bench).await?;
    // The small backlog is drained many times over at one site, as many readings in
    // all as the large backlog holds (up to a million) and the same readings with the
    // same ids, into one Client System: what differs between the two sides is only how
    // many readings wait at once. Half the small drains run before the large one and
    // half after it, so that a drift of the machine's speed weighs on both sides alike.
    let small_runs = (large / SMALL_BACKLOG).clamp(2, MAX_SMALL_RUNS);
    let mut small_site = bench.drain_site("drain-small", 0).await?;
    let mut smalls = Vec::new();
    let (mut small_measured, mut small_span_ms) = (0, 0);
    let mut small_cycles = Vec::new();
    let mut small_split = Split::default();
    let mut small_drains = async |site: &mut DrainSite, runs: std::ops::Range<usize>| {
        eprintln!(
            "bench: drain, {SMALL_BACKLOG} queued, runs {} to {} of {small_runs}…",
            runs.start + 1,
            runs.end
        );
        for _ in runs {
            let drained = drain(site, SMALL_BACKLOG).await?;
            smalls.push(drained.rate());
            small_measured += drained.measured;
            small_span_ms += drained.span_ms;
            small_cycles.extend(drained.cycles);
            small_split = small_split.add(drained.whole_split);
        }
        anyhow::Ok(())
    };
    small_drains(&mut small_site, 0..small_runs / 2).await?;
    eprintln!("bench: drain, {large} queued…");
    let mut large_site = bench.drain_site("drain-large", 0).await?;
    let mut big_drain = drain(&mut large_site, large).await?;
    large_site.client.stop().await;
    if postgres.is_some() {
        // The large site emptied the database they share: the small one starts again
        // where it was.
        let queued = small_site.queued;
        small_site.client.stop().await;
        small_site = bench.drain_site("drain-small-again", queued).await?;
    }
    small_drains(&mut small_site, small_runs / 2..small_runs).await?;
    small_site.client.stop().await;
    smalls.sort_by(f64::total_cmp);
    eprintln!(
        "bench: small drains, readings/s: slowest {:.0}, median {:.0}, fastest {:.0}",
        smalls[0],
        smalls[smalls.len() / 2],
        smalls[smalls.len() - 1]
    );
    let small = rate(small_measured, small_span_ms);
    let big = big_drain.rate();
    // The typical batch, small backlog against large: the middle of the cycles is not
    // moved by the few batches a busy moment slows down, which a ten-batch drain cannot
    // average out.
    // Its tenths first: the mean below sorts the cycles.
    let tenths = big_drain.tenths();
    let small_cycle = middle_mean(&mut small_cycles);
    let big_cycle = middle_mean(&mut big_drain.cycles);
    let (small_spread, small_slowest) = spread(&small_cycles);
    let (big_spread, big_slowest) = spread(&big_drain.cycles);

    println!("queue benchmark ({backend}, batches of 1000, release build, loopback)");
    println!("{:<44} {:>14}", "measure", "readings/s");
    println!(
        "{:<44} {:>14.0}",
        "ingest, POST /v1/readings (2 clients)", ingest_rate
    );
    println!(
        "{:<44} {:>14.0}",
        format!("drain, {SMALL_BACKLOG} queued"),
        small
    );
    println!("{:<44} {:>14.0}", format!("drain, {large} queued"), big);
    println!("{:<44} {:>14.2}", "drain ratio large/small", big / small);
    println!(
        "{:<44} {:>14}",
        "  ms per batch (middle 80%), small / large",
        format!("{small_cycle:.2} / {big_cycle:.2}")
    );
    println!(
        "{:<44} {:>14.2}",
        "  batch speed large/small (middle 80%)",
        small_cycle / big_cycle
    );
    for (label, [p50, p90, p99, max], slowest) in [
        ("small", small_spread, small_slowest),
        ("large", big_spread, big_slowest),
    ] {
        println!(
            "{:<44} {:>14}",
            format!("  ms per batch p50/p90/p99/max, {label}"),
            format!("{p50}/{p90}/{p99}/{max}")
        );
        println!(
            "{:<44} {:>14.2}",
            format!("  share of time in slowest 10%, {label}"),
            slowest
        );
    }
    // Where a large backlog's extra time per batch goes: into the attempts (encoder,
    // transport, Client System) or between them (syncd's work on the queue).
    let small_split = small_split.per_batch();
    let big_split = big_drain.whole_split.per_batch();
    println!(
        "{:<44} {:>14}",
        "  ms per batch in attempt, small / large",
        format!("{:.2} / {:.2}", small_split.0, big_split.0)
    );
    println!(
        "{:<44} {:>14}",
        "  ms per batch between, small / large",
        format!("{:.2} / {:.2}", small_split.1, big_split.1)
    );
    if let Some((head, tail)) = big_drain.head_and_tail {
        for (label, (inside, between)) in [
            ("first", big_drain.head_split.per_batch()),
            ("last", big_drain.tail_split.per_batch()),
        ] {
            println!(
                "{:<44} {:>14}",
                format!("  {label} {WINDOW}: ms per batch in attempt / between"),
                format!("{inside:.1} / {between:.1}")
            );
        }
        println!(
            "{:<44} {:>14.0}",
            format!("  first {WINDOW} batches of the {large}"),
            head
        );
        println!(
            "{:<44} {:>14.0}",
            format!("  last {WINDOW} batches of the {large}"),
            tail
        );
        println!(
            "{:<44} {:>14.2}",
            "  ratio first/last (same run)",
            head / tail
        );
    }
    if !tenths.is_empty() {
        let shown: Vec<String> = tenths.iter().map(|ms| format!("{ms:.1}")).collect();
        println!(
            "  ms per batch in each tenth of the {large}: {}",
            shown.join(" ")
        );
    }

    let json = serde_json::json!({
        "backend": backend,
        "ingest_readings_per_s": ingest_rate,
        "drain": [
            { "queued": SMALL_BACKLOG, "readings_per_s": small },
            { "queued": large, "readings_per_s": big },
        ],
        "drain_ratio_large_over_small": big / small,
        "drain_batch_ms_middle_80_small": small_cycle,
        "drain_batch_ms_middle_80_large": big_cycle,
        "drain_batch_speed_large_over_small": small_cycle / big_cycle,
        "drain_batch_ms_p50_p90_p99_max_small": small_spread,
        "drain_batch_ms_p50_p90_p99_max_large": big_spread,
        "drain_time_share_slowest_10pct_small": small_slowest,
        "drain_time_share_slowest_10pct_large": big_slowest,
        "drain_attempt_ms_per_batch_small": small_split.0,
        "drain_attempt_ms_per_batch_large": big_split.0,
        "drain_between_ms_per_batch_small": small_split.1,
        "drain_between_ms_per_batch_large": big_split.1,
        "large_drain_head_and_tail_readings_per_s": big_drain.head_and_tail,
        "large_drain_ms_per_batch_by_tenth": tenths,
    });
    common::write_json("queue", &json)?;
    Ok(())
}
