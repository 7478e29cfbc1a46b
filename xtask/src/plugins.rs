//! `cargo xtask plugins`: every crate under `plugins/` built into a component at
//! `target/plugins/<crate>.wasm`.
//!
//! The wasm32 standard library comes from rustup's `wasm32-unknown-unknown` target when
//! it is installed. Otherwise (no target, and no way to download one) this provisions a
//! toolchain from Debian's archive by itself: `rustc-web` and its libraries, plus the
//! matching standard library source, unpacked (not installed) under
//! `target/wasm-toolchain/`; the standard library is then compiled from source with
//! `-Zbuild-std`, and linked with rustup's bundled `rust-lld`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{Workspace, run};

const WASM_TARGET: &str = "wasm32-unknown-unknown";

/// Builds every plugin and returns the paths of the components written: the Rust
/// crates of the plugins workspace, then the JavaScript plugins under `plugins/js/`
/// (when npm is installed; without it they are skipped with a warning).
pub fn build(ws: &Workspace) -> Result<Vec<PathBuf>> {
    let plugins_dir = ws.root.join("plugins");
    let out_dir = ws.target.join("plugins");
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("failed to create {}", out_dir.display()))?;

    let mut cargo = wasm_cargo(ws)?;
    cargo.current_dir(&plugins_dir).arg("--locked");
    run(&mut cargo).context("failed to build the plugins for wasm32")?;

    let mut written = Vec::new();
    for name in plugin_crates(&plugins_dir)? {
        let out = out_dir.join(format!("{name}.wasm"));
        componentize_crate(ws, &name, &out)?;
        written.push(out);
    }
    written.extend(javascript::build(&plugins_dir.join("js"), &out_dir)?);
    Ok(written)
}

/// Builds one plugin crate of its own (not a member of the plugins workspace, e.g. made
/// by `syncd plugin new`) into a component at `<dir>/<crate>.wasm`, and returns that path.
pub fn build_crate(ws: &Workspace, dir: &Path) -> Result<PathBuf> {
    let manifest = dir.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).with_context(|| {
        format!(
            "no plugin crate at {}: failed to read {}",
            dir.display(),
            manifest.display()
        )
    })?;
    let name = text
        .lines()
        .find_map(|l| {
            let value = l
                .trim()
                .strip_prefix("name")?
                .trim_start()
                .strip_prefix('=')?;
            Some(value.trim().trim_matches('"').to_owned())
        })
        .with_context(|| format!("{} names no package", manifest.display()))?
        .replace('-', "_");
    let mut cargo = wasm_cargo(ws)?;
    run(cargo.current_dir(dir))
        .with_context(|| format!("failed to build {} for wasm32", dir.display()))?;
    let out = dir.join(format!("{name}.wasm"));
    componentize_crate(ws, &name, &out)?;
    Ok(out)
}

/// `cargo build --release --target wasm32-unknown-unknown` into the shared wasm
/// target directory, with rustup's target when it is installed and otherwise with the
/// provisioned fallback toolchain; the caller sets the folder it runs in.
fn wasm_cargo(ws: &Workspace) -> Result<Command> {
    let sysroot = rustup_sysroot()?;
    let mut cargo = Command::new(&ws.cargo);
    cargo
        .args(["build", "--release", "--target", WASM_TARGET])
        .arg("--target-dir")
        .arg(wasm_target_dir(ws))
        // The outer `cargo run` sets these for the xtask itself; they must not leak
        // into the plugin build.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS");

    if sysroot
        .join("lib/rustlib")
        .join(WASM_TARGET)
        .join("lib")
        .is_dir()
    {
        eprintln!("xtask: building plugins with rustup's {WASM_TARGET} target");
    } else {
        let toolchain = fallback::ensure(&ws.target.join("wasm-toolchain"))?;
        let host = host_triple()?;
        let lld = sysroot.join(format!("lib/rustlib/{host}/bin/rust-lld"));
        if !lld.is_file() {
            bail!(
                "rustup's bundled linker is missing at {}; it ships with every rustup toolchain",
                lld.display()
            );
        }
        eprintln!(
            "xtask: no {WASM_TARGET} target in rustup; building plugins with {} and std from source",
            toolchain.version
        );
        cargo
            .env("RUSTC", &toolchain.rustc)
            .env("RUSTC_BOOTSTRAP", "1")
            .env("LD_LIBRARY_PATH", &toolchain.lib_dir)
            .arg("-Zbuild-std=std,panic_abort")
            .arg("--config")
            .arg(format!(
                "target.{WASM_TARGET}.linker={}",
                toml_string(&lld.to_string_lossy())
            ));
    }
    Ok(cargo)
}

/// Every wasm build shares one target directory, so the standard library built from
/// source is built once.
fn wasm_target_dir(ws: &Workspace) -> PathBuf {
    ws.target.join("wasm-build")
}

/// The core module cargo built for crate `name`, made a component at `out`.
fn componentize_crate(ws: &Workspace, name: &str, out: &Path) -> Result<()> {
    let module_path = wasm_target_dir(ws)
        .join(WASM_TARGET)
        .join("release")
        .join(format!("{name}.wasm"));
    let module = std::fs::read(&module_path)
        .with_context(|| format!("failed to read {}", module_path.display()))?;
    let component = componentize(&module)
        .with_context(|| format!("failed to make a component of {}", module_path.display()))?;
    // Beside it, then renamed into place: a daemon watching the file never reads half
    // of it.
    let partial = out.with_extension("wasm.partial");
    std::fs::write(&partial, &component)
        .with_context(|| format!("failed to write {}", partial.display()))?;
    std::fs::rename(&partial, out)
        .with_context(|| format!("failed to rename {} into place", partial.display()))?;
    eprintln!("xtask: {} ({} KiB)", out.display(), component.len() / 1024);
    Ok(())
}

/// Wraps a core module (with its embedded WIT type information) into a component.
fn componentize(module: &[u8]) -> Result<Vec<u8>> {
    wit_component::ComponentEncoder::default()
        .module(module)?
        .validate(true)
        .encode()
}

/// The crate names of the plugins workspace's members: every folder under `plugins/`
/// with a Cargo.toml.
fn plugin_crates(plugins_dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(plugins_dir)
        .with_context(|| format!("failed to list {}", plugins_dir.display()))?
    {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str());
        if let (true, Some(name)) = (path.join("Cargo.toml").is_file(), name) {
            names.push(name.replace('-', "_"));
        }
    }
    names.sort();
    Ok(names)
}

fn rustup_sysroot() -> Result<PathBuf> {
    let out = Command::new("rustc")
        .args(["--print", "sysroot"])
        .env_remove("RUSTC")
        .output()
        .context("failed to run rustc: is a Rust toolchain installed?")?;
    if !out.status.success() {
        bail!("rustc --print sysroot failed");
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

fn host_triple() -> Result<String> {
    let out = Command::new("rustc").arg("-vV").output()?;
    let text = String::from_utf8(out.stdout)?;
    text.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("rustc -vV printed no host triple")
}

fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

mod fallback {
    //! The Debian toolchain of `../shared/TOOLCHAIN.md`, provisioned once into a cache.

    use super::*;

    /// A provisioned toolchain.
    pub struct Toolchain {
        pub rustc: PathBuf,
        pub lib_dir: PathBuf,
        pub version: String,
    }

    /// Written last, so an interrupted provisioning starts again.
    const COMPLETE_MARKER: &str = ".complete";

    pub fn ensure(prefix: &Path) -> Result<Toolchain> {
        let toolchain = Toolchain {
            rustc: prefix.join("usr/bin/rustc"),
            lib_dir: prefix.join("usr/lib/x86_64-linux-gnu"),
            version: String::new(),
        };
        if !prefix.join(COMPLETE_MARKER).is_file() {
            provision(prefix)?;
        }
        let version = rustc_version(&toolchain)?;
        Ok(Toolchain {
            version,
            ..toolchain
        })
    }

    fn provision(prefix: &Path) -> Result<()> {
        if Command::new("apt-get").arg("--version").output().is_err() {
            bail!(
                "no {WASM_TARGET} target is installed and this is not a Debian machine.\n\
                 Install the target with: rustup target add {WASM_TARGET}"
            );
        }
        eprintln!(
            "xtask: provisioning the wasm toolchain into {}",
            prefix.display()
        );
        if prefix.exists() {
            std::fs::remove_dir_all(prefix)
                .with_context(|| format!("failed to clear {}", prefix.display()))?;
        }
        let debs = prefix.join("debs");
        std::fs::create_dir_all(&debs)?;

        if apt_depends("rustc-web").is_err() {
            eprintln!("xtask: package lists have no rustc-web; running apt-get update");
            run(Command::new("apt-get").arg("update"))
                .context("apt-get update failed (run as root, or install the rustup target)")?;
        }
        let std_pkg = apt_depends("libstd-rust-web-dev")?
            .into_iter()
            .find(|d| d.starts_with("libstd-rust-web-"))
            .context("libstd-rust-web-dev depends on no libstd-rust-web-<version>")?;
        let llvm_pkg = apt_depends(&std_pkg)?
            .into_iter()
            .find(|d| d.starts_with("libllvm"))
            .with_context(|| format!("{std_pkg} depends on no libllvm<N>"))?;
        let packages = [
            "rustc-web",
            "libstd-rust-web-dev",
            &std_pkg,
            "rust-web-src",
            &llvm_pkg,
        ];
        run(Command::new("apt-get")
            .current_dir(&debs)
            .arg("download")
            .args(packages))
        .with_context(|| format!("failed to download {}", packages.join(" ")))?;

        for entry in std::fs::read_dir(&debs)? {
            let deb = entry?.path();
            if deb.extension().is_some_and(|e| e == "deb") {
                run(Command::new("dpkg").arg("-x").arg(&deb).arg(prefix))
                    .with_context(|| format!("failed to unpack {}", deb.display()))?;
            }
        }

        // cargo -Zbuild-std looks for the source at <sysroot>/lib/rustlib/src/rust.
        let src_root = prefix.join("usr/src");
        let source = std::fs::read_dir(&src_root)
            .with_context(|| format!("rust-web-src unpacked nothing under {}", src_root.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.join("library").is_dir())
            .context("rust-web-src has no library/ folder")?;
        // rust-web-src ships that link; older packagings did not.
        let link = prefix.join("usr/lib/rustlib/src/rust");
        if !link.join("library").is_dir() {
            std::fs::create_dir_all(link.parent().context("link has a parent")?)?;
            std::os::unix::fs::symlink(&source, &link)
                .with_context(|| format!("failed to link {}", link.display()))?;
        }

        std::fs::remove_dir_all(&debs)?;
        std::fs::write(prefix.join(COMPLETE_MARKER), packages.join("\n"))?;
        Ok(())
    }

    /// The names a package directly depends on, per apt-cache.
    fn apt_depends(package: &str) -> Result<Vec<String>> {
        let out = Command::new("apt-cache")
            .args(["depends", package])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let deps: Vec<String> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .map(|d| d.trim_matches(['<', '>']).to_owned())
            .collect();
        if !out.status.success() || !text.starts_with(package) {
            bail!("apt-cache knows no package {package}");
        }
        Ok(deps)
    }

    fn rustc_version(toolchain: &Toolchain) -> Result<String> {
        let out = Command::new(&toolchain.rustc)
            .arg("--version")
            .env("LD_LIBRARY_PATH", &toolchain.lib_dir)
            .output()
            .with_context(|| format!("failed to run {}", toolchain.rustc.display()))?;
        if !out.status.success() {
            bail!(
                "{} does not run: {}",
                toolchain.rustc.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

mod javascript {
    //! Plugins written in JavaScript, one npm package a folder under `plugins/js/`, each
    //! with a `build` script (componentize-js) that writes `<folder>.wasm` beside it.

    use super::*;

    /// Builds every JavaScript plugin that changed since its last build; nothing (with
    /// a warning) when npm is not installed.
    pub fn build(js_dir: &Path, out_dir: &Path) -> Result<Vec<PathBuf>> {
        let mut folders = Vec::new();
        if js_dir.is_dir() {
            for entry in std::fs::read_dir(js_dir)? {
                let path = entry?.path();
                if path.join("package.json").is_file() {
                    folders.push(path);
                }
            }
        }
        folders.sort();
        if folders.is_empty() {
            return Ok(Vec::new());
        }
        if Command::new("npm").arg("--version").output().is_err() {
            eprintln!(
                "xtask: warning: npm is not installed; the JavaScript plugins under {} are not built \
                 (install Node.js and npm: apt-get install nodejs npm)",
                js_dir.display()
            );
            return Ok(Vec::new());
        }
        let mut written = Vec::new();
        for folder in folders {
            let name = folder
                .file_name()
                .and_then(|n| n.to_str())
                .context("a plugin folder has a UTF-8 name")?
                .to_owned();
            let built = folder.join(format!("{name}.wasm"));
            let installed = folder.join("node_modules/.package-lock.json");
            if newest(&folder.join("package-lock.json"))? > modified(&installed) {
                eprintln!("xtask: npm ci in {}", folder.display());
                run(Command::new("npm").current_dir(&folder).args([
                    "ci",
                    "--no-audit",
                    "--no-fund",
                ]))
                .with_context(|| format!("npm ci failed in {}", folder.display()))?;
            }
            let sources = newest(&folder)?.max(newest(&js_dir.join("../../wit"))?);
            if sources > modified(&built) {
                eprintln!("xtask: componentize-js in {}", folder.display());
                run(Command::new("npm")
                    .current_dir(&folder)
                    .args(["run", "--silent", "build"]))
                .with_context(|| format!("npm run build failed in {}", folder.display()))?;
            }
            let out = out_dir.join(format!("{name}.wasm"));
            std::fs::copy(&built, &out).with_context(|| {
                format!(
                    "the build script of {} wrote no {}",
                    folder.display(),
                    built.display()
                )
            })?;
            eprintln!(
                "xtask: {} ({} KiB)",
                out.display(),
                std::fs::metadata(&out)?.len() / 1024
            );
            written.push(out);
        }
        Ok(written)
    }

    /// When `path` was last modified; the epoch when it does not exist.
    fn modified(path: &Path) -> std::time::SystemTime {
        std::fs::metadata(path)
            .and_then(|m| m.modified())
            .unwrap_or(std::time::SystemTime::UNIX_EPOCH)
    }

    /// The latest modification of `path` or, for a folder, of any source file in it
    /// (node_modules and built components aside).
    fn newest(path: &Path) -> Result<std::time::SystemTime> {
        let mut latest = modified(path);
        if path.is_dir() {
            for entry in std::fs::read_dir(path)? {
                let entry = entry?.path();
                let skip = entry.file_name().is_some_and(|n| n == "node_modules")
                    || entry.extension().is_some_and(|e| e == "wasm");
                if !skip {
                    latest = latest.max(newest(&entry)?);
                }
            }
        }
        Ok(latest)
    }
}
