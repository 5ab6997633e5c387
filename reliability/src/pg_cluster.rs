//! A throwaway PostgreSQL cluster, for tests that restart or stop the
//! server: never the shared one other tests use.
//!
//! [`TempCluster::start`] runs `initdb` into a temporary directory and
//! `pg_ctl start` on a free port (binaries from `PATH` or
//! `/usr/lib/postgresql/*/bin`), without durable commits (fast), or with
//! PostgreSQL's stock durability ([`TempCluster::start_durable`], for
//! tests that crash the server). `initdb` refuses to run as root, so as
//! root the cluster belongs to the `postgres` OS user and every command
//! runs through `runuser`. Dropping the value stops the server and removes
//! the directory.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Set to `1` to let tests that need a throwaway cluster pass when none
/// can be made on this machine. CI must not set it.
pub const OPT_OUT_ENV: &str = "RELAYQ_SKIP_THROWAWAY_PG";

/// A PostgreSQL server of its own, in a temporary directory.
#[derive(Debug)]
pub struct TempCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    owner: Option<String>,
    port: u16,
    /// fsync, synchronous commits and full-page writes on, as shipped.
    durable: bool,
}

impl TempCluster {
    /// Creates and starts a cluster (trust authentication, user
    /// `postgres`, fsync off). The error says what is missing.
    pub fn start() -> Result<Self, String> {
        Self::start_with(false)
    }

    /// [`Self::start`] with PostgreSQL's stock durability: a commit is
    /// flushed to disk before it is reported (unless its session turned
    /// `synchronous_commit` off), so it survives [`Self::crash`].
    pub fn start_durable() -> Result<Self, String> {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> Result<Self, String> {
        let bin = bindir().ok_or(
            "no PostgreSQL server binaries (initdb and pg_ctl on PATH or under \
             /usr/lib/postgresql/*/bin): install the PostgreSQL server package",
        )?;
        let owner = if is_root() {
            let ok = Command::new("id")
                .args(["-u", "postgres"])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if !ok {
                return Err(
                    "running as root, and there is no `postgres` OS user to run \
                            initdb as (initdb refuses root)"
                        .into(),
                );
            }
            Some("postgres".to_owned())
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("relayq-pg-restart.")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let port = free_port()?;
        let cluster = Self {
            dir,
            bin,
            owner,
            port,
            durable,
        };
        if let Some(owner) = &cluster.owner {
            run(Command::new("chown").arg(owner).arg(cluster.dir.path()))?;
        }
        cluster.pg(
            "initdb",
            &[
                "-D",
                &cluster.data().to_string_lossy(),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
        )?;
        cluster.ctl("start")?;
        Ok(cluster)
    }

    /// Like [`Self::start`], but `None` (after printing why) when the
    /// machine cannot make one and [`OPT_OUT_ENV`] is `1`. Without the
    /// opt-out, failing to make one panics with the reason.
    pub fn start_or_opt_out() -> Option<Self> {
        Self::opt_out_unless(Self::start())
    }

    /// [`Self::start_durable`], or `None` as [`Self::start_or_opt_out`].
    pub fn start_durable_or_opt_out() -> Option<Self> {
        Self::opt_out_unless(Self::start_durable())
    }

    fn opt_out_unless(started: Result<Self, String>) -> Option<Self> {
        match started {
            Ok(cluster) => Some(cluster),
            Err(e) if std::env::var(OPT_OUT_ENV).as_deref() == Ok("1") => {
                eprintln!("skipped: no throwaway PostgreSQL cluster ({e}); {OPT_OUT_ENV}=1");
                None
            }
            Err(e) => panic!(
                "this test needs a throwaway PostgreSQL cluster it may restart, and none \
                 could be made: {e}. (Set {OPT_OUT_ENV}=1 to skip it on machines without \
                 PostgreSQL server binaries; CI must not.)"
            ),
        }
    }

    /// The superuser URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Restarts the server (`pg_ctl restart -m fast`): every session is
    /// terminated, and the server is back when this returns.
    pub fn restart(&self) -> Result<(), String> {
        self.ctl("restart")
    }

    /// Stops the server (`-m fast`).
    pub fn stop(&self) -> Result<(), String> {
        self.stop_with("fast")
    }

    /// Crashes the server: `pg_ctl stop -m immediate` kills every server
    /// process at once, with no shutdown checkpoint, and WAL not yet
    /// written from shared memory is lost; then starts it again, which
    /// recovers from the WAL on disk. What a crash of the database host's
    /// PostgreSQL does (not of its operating system).
    pub fn crash(&self) -> Result<(), String> {
        self.stop_with("immediate")?;
        self.ctl("start")
    }

    /// `pg_ctl stop` in shutdown `mode`.
    fn stop_with(&self, mode: &str) -> Result<(), String> {
        self.pg(
            "pg_ctl",
            &[
                "-D",
                &self.data().to_string_lossy(),
                "-m",
                mode,
                "-w",
                "stop",
            ],
        )
        .map(drop)
    }

    /// Starts it again after [`Self::stop`].
    pub fn start_again(&self) -> Result<(), String> {
        self.ctl("start")
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn ctl(&self, action: &str) -> Result<(), String> {
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=100",
            self.port,
            self.dir.path().display()
        );
        if !self.durable {
            options.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        let log = self.dir.path().join("server.log");
        self.pg(
            "pg_ctl",
            &[
                "-D",
                &self.data().to_string_lossy(),
                "-l",
                &log.to_string_lossy(),
                "-w",
                "-t",
                "60",
                "-m",
                "fast",
                "-o",
                &options,
                action,
            ],
        )
        .map_err(|e| {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            format!("{e}\nserver log:\n{log}")
        })
        .map(drop)
    }

    fn pg(&self, program: &str, args: &[&str]) -> Result<Output, String> {
        let exe = self.bin.join(program);
        let mut cmd = match &self.owner {
            Some(owner) => {
                let mut c = Command::new("runuser");
                c.args(["-u", owner, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.args(args);
        run(&mut cmd)
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        let _ = self.stop_with("immediate");
    }
}

fn run(cmd: &mut Command) -> Result<Output, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// The newest directory holding both `initdb` and `pg_ctl`.
fn bindir() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<(u32, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                Some((v, e.path().join("bin")))
            })
            .collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev().map(|(_, p)| p));
    }
    candidates
        .into_iter()
        .find(|dir| has(dir, "initdb") && has(dir, "pg_ctl"))
}

fn has(dir: &Path, program: &str) -> bool {
    dir.join(program).is_file()
}

fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("free port: {e}"))
}
