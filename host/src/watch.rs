//! Watching `sync.toml` and the plugin files for changes.
//!
//! A file is watched through its folder, so that a file replaced by a rename (as
//! editors and build tools save) is seen like one written in place. The folder of
//! `sync.toml` usually also holds the SQLite queue, which is written many times per
//! batch: on Linux the kernel is asked only for the events that finish a change (a
//! file closed after writing, moved in or out, created, deleted), so the queue's
//! writes, which keep their files open, wake nothing. A file written in place is
//! reported once its writer closes it, not at each write (a new file is also reported
//! when it is created: a slow copy can then be read before it is whole, refused, and
//! reloaded again when it is closed). Elsewhere the `notify`
//! crate's watcher is used, which reports every event and lets this module filter.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::mpsc;
use tracing::warn;

/// The files of interest, shared with the thread that receives the events.
type Files = Arc<RwLock<BTreeSet<PathBuf>>>;

/// Watches files for changes and says so, with `()`, on a channel.
pub struct FileWatcher {
    backend: Option<Backend>,
    files: Files,
    folders: BTreeSet<PathBuf>,
    /// Events received from the system, of any file in a watched folder.
    events: Arc<AtomicU64>,
}

impl FileWatcher {
    /// A watcher sending `()` on `changed` whenever a watched file changes. If the
    /// system cannot watch files, it logs why and watches nothing (reloads are still
    /// possible by SIGHUP, `syncd reload` or `POST /v1/reload`).
    pub fn new(changed: mpsc::UnboundedSender<()>) -> Self {
        let files = Files::default();
        let events = Arc::new(AtomicU64::new(0));
        let report = Report {
            files: Arc::clone(&files),
            changed,
            events: Arc::clone(&events),
        };
        let backend = match Backend::new(report) {
            Ok(backend) => Some(backend),
            Err(error) => {
                warn!("cannot watch files, reload by SIGHUP or `syncd reload`: {error}");
                None
            }
        };
        Self {
            backend,
            files,
            folders: BTreeSet::new(),
            events,
        }
    }

    /// Watches `files` (their folders, so that a file replaced by a rename is seen),
    /// instead of those watched before; folders watched once stay watched.
    pub fn watch(&mut self, files: &[PathBuf]) {
        let Some(backend) = self.backend.as_mut() else {
            return;
        };
        let mut wanted = BTreeSet::new();
        for file in files {
            let (Some(folder), Some(name)) = (file.parent(), file.file_name()) else {
                continue;
            };
            let folder = if folder.as_os_str().is_empty() {
                Path::new(".")
            } else {
                folder
            };
            let Ok(folder) = folder.canonicalize() else {
                warn!("cannot watch {}: its folder is missing", file.display());
                continue;
            };
            wanted.insert(folder.join(name));
            if !self.folders.contains(&folder) {
                match backend.watch_folder(&folder) {
                    Ok(()) => {
                        self.folders.insert(folder);
                    }
                    Err(error) => warn!("cannot watch {}: {error}", folder.display()),
                }
            }
        }
        *self
            .files
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = wanted;
    }

    /// How many events the system has delivered so far, for any file of the watched
    /// folders (those of no interest included).
    pub fn events_received(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }
}

/// What the backend does with an event: counts it, and says `changed` when it
/// concerns a watched file. False once nobody listens any more.
struct Report {
    files: Files,
    changed: mpsc::UnboundedSender<()>,
    events: Arc<AtomicU64>,
}

impl Report {
    fn event(&self, paths: impl IntoIterator<Item = PathBuf>) -> bool {
        self.events.fetch_add(1, Ordering::Relaxed);
        let files = self
            .files
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if paths.into_iter().any(|p| files.contains(&p)) {
            return self.changed.send(()).is_ok();
        }
        !self.changed.is_closed()
    }

    /// Events were lost (the system's queue overflowed): any file may have changed.
    fn overflow(&self) -> bool {
        self.changed.send(()).is_ok()
    }
}

#[cfg(target_os = "linux")]
use linux::Backend;

#[cfg(target_os = "linux")]
mod linux {
    use std::collections::HashMap;
    use std::io;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, RwLock};

    use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
    use tracing::warn;

    use super::Report;

    /// The events that end a change to a file in a watched folder. Not `MODIFY`
    /// (each write) nor `OPEN` and `ACCESS`: a database in the folder would send
    /// those by the thousand.
    const MASK: WatchMask = WatchMask::CLOSE_WRITE
        .union(WatchMask::MOVED_TO)
        .union(WatchMask::MOVED_FROM)
        .union(WatchMask::CREATE)
        .union(WatchMask::DELETE)
        .union(WatchMask::ONLYDIR)
        .union(WatchMask::EXCL_UNLINK);

    /// Folders by watch, shared with the thread reading the events.
    type Folders = Arc<RwLock<HashMap<WatchDescriptor, PathBuf>>>;

    /// An inotify instance and the thread reading its events, started with the
    /// first folder watched.
    pub(super) struct Backend {
        watches: Watches,
        folders: Folders,
        reader: Option<(Inotify, Report)>,
        stop: Arc<AtomicBool>,
    }

    impl Backend {
        pub(super) fn new(report: Report) -> io::Result<Self> {
            let inotify = Inotify::init()?;
            Ok(Self {
                watches: inotify.watches(),
                folders: Folders::default(),
                reader: Some((inotify, report)),
                stop: Arc::default(),
            })
        }

        pub(super) fn watch_folder(&mut self, folder: &Path) -> io::Result<()> {
            let wd = self.watches.add(folder, MASK)?;
            self.folders
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .insert(wd, folder.to_owned());
            if let Some((inotify, report)) = self.reader.take() {
                let (folders, stop) = (Arc::clone(&self.folders), Arc::clone(&self.stop));
                std::thread::Builder::new()
                    .name("file-watch".into())
                    .spawn(move || read_events(inotify, &folders, &report, &stop))?;
            }
            Ok(())
        }
    }

    impl Drop for Backend {
        /// Stops the reading thread: removing the watches wakes it with one last
        /// event each, after which it sees `stop` and ends.
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            let watched: Vec<WatchDescriptor> = self
                .folders
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .keys()
                .cloned()
                .collect();
            for wd in watched {
                let _ = self.watches.remove(wd);
            }
        }
    }

    fn read_events(mut inotify: Inotify, folders: &Folders, report: &Report, stop: &AtomicBool) {
        let mut buffer = vec![0; 16 * 1024];
        loop {
            let events = match inotify.read_events_blocking(&mut buffer) {
                Ok(events) => events,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    warn!("file watching stopped, reload by SIGHUP or `syncd reload`: {error}");
                    return;
                }
            };
            if stop.load(Ordering::Relaxed) {
                return;
            }
            for event in events {
                let listening = if event.mask.contains(EventMask::Q_OVERFLOW) {
                    report.overflow()
                } else if event.mask.contains(EventMask::IGNORED) {
                    // The folder is gone (or no longer watched): so is its watch.
                    folders
                        .write()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .remove(&event.wd);
                    true
                } else {
                    let folder = folders
                        .read()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .get(&event.wd)
                        .cloned();
                    match (folder, event.name) {
                        (Some(folder), Some(name)) => report.event([folder.join(name)]),
                        _ => true,
                    }
                };
                if !listening {
                    return;
                }
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
use portable::Backend;

#[cfg(not(target_os = "linux"))]
mod portable {
    use std::path::Path;

    use notify::Watcher as _;

    use super::Report;

    /// The `notify` crate's watcher for this system.
    pub(super) struct Backend(notify::RecommendedWatcher);

    impl Backend {
        pub(super) fn new(report: Report) -> notify::Result<Self> {
            let handler = move |result: notify::Result<notify::Event>| {
                if let Ok(event) = result
                    && !event.kind.is_access()
                {
                    report.event(event.paths);
                }
            };
            Ok(Self(notify::recommended_watcher(handler)?))
        }

        pub(super) fn watch_folder(&mut self, folder: &Path) -> notify::Result<()> {
            self.0.watch(folder, notify::RecursiveMode::NonRecursive)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// `sync.toml` written with `text` in `dir`, and a watcher on it with its channel.
    fn watching_config(
        dir: &Path,
        text: &str,
    ) -> (PathBuf, FileWatcher, mpsc::UnboundedReceiver<()>) {
        let config = dir.join("sync.toml");
        std::fs::write(&config, text).unwrap();
        let (changed, changes) = mpsc::unbounded_channel();
        let mut watcher = FileWatcher::new(changed);
        watcher.watch(std::slice::from_ref(&config));
        (config, watcher, changes)
    }

    /// Waits up to `within` for a change to be reported.
    async fn reported(changes: &mut mpsc::UnboundedReceiver<()>, within: Duration) -> bool {
        tokio::time::timeout(within, changes.recv()).await.is_ok()
    }

    /// Only on Linux: elsewhere the `notify` crate's watcher is sent every write.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_file_written_beside_the_watched_ones_wakes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        // What a database does beside sync.toml: its file kept open and written to.
        use std::io::Write as _;
        let mut database = std::fs::File::create(dir.path().join("syncd.db")).unwrap();
        let (config, watcher, mut changes) = watching_config(dir.path(), "# first\n");

        for _ in 0..200 {
            database.write_all(&[0; 4096]).unwrap();
            database.sync_data().unwrap();
        }
        assert!(!reported(&mut changes, Duration::from_millis(300)).await);
        assert_eq!(
            watcher.events_received(),
            0,
            "writes to another file of the folder woke the watcher"
        );

        // The watched file written and closed, then replaced by a rename.
        std::fs::write(&config, "# second\n").unwrap();
        assert!(reported(&mut changes, Duration::from_secs(5)).await);
        let partial = dir.path().join("sync.toml.partial");
        std::fs::write(&partial, "# third\n").unwrap();
        while changes.try_recv().is_ok() {}
        std::fs::rename(&partial, &config).unwrap();
        assert!(reported(&mut changes, Duration::from_secs(5)).await);
    }

    /// The thread reading the events ends with the watcher: its end of the channel,
    /// the only sender left, then closes.
    #[tokio::test]
    async fn a_dropped_watcher_stops_reading_events() {
        let dir = tempfile::tempdir().unwrap();
        let (_, watcher, mut changes) = watching_config(dir.path(), "");
        drop(watcher);
        let closed = tokio::time::timeout(Duration::from_secs(5), changes.recv()).await;
        assert_eq!(closed, Ok(None), "the watcher's thread outlived it");
    }

    #[tokio::test]
    async fn a_file_of_no_interest_in_the_folder_is_not_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (_, watcher, mut changes) = watching_config(dir.path(), "");
        std::fs::write(dir.path().join("notes.txt"), "written and closed").unwrap();
        assert!(!reported(&mut changes, Duration::from_millis(300)).await);
        // It was seen, and found of no interest.
        assert!(watcher.events_received() > 0);
    }
}
