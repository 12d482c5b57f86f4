//! Starting `periscope serve` as an operator does, for the tests of this directory.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub fn periscope() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_periscope"));
    for var in
        ["PERISCOPE_API_KEY", "PERISCOPE_AGENT_KEY", "PERISCOPE_DATA_DIR", "PERISCOPE_CONFIG", "PERISCOPE_LISTEN"]
    {
        cmd.env_remove(var);
    }
    cmd.env("PERISCOPE_LOG", "info");
    cmd
}

pub fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("periscope-cli-{what}-{}", periscope_protocol::ActionId::generate()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A `periscope serve` child process on a free port.
pub struct Served {
    pub child: Child,
    pub base: String,
    /// What it printed on standard error before it listened.
    pub startup: String,
}

impl Served {
    pub fn start(data_dir: &Path) -> Served {
        Self::start_with(&["--listen".as_ref(), "127.0.0.1:0".as_ref(), "--data-dir".as_ref(), data_dir.as_os_str()])
    }

    /// `periscope serve` with these arguments.
    pub fn start_with(args: &[&std::ffi::OsStr]) -> Served {
        let mut child = periscope()
            .arg("serve")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("periscope serve starts");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut startup = String::new();
        let base = loop {
            let line = lines.next().expect("periscope serve prints until it listens").unwrap();
            startup.push_str(&line);
            startup.push('\n');
            if line.contains("periscope broker listening")
                && let Some(addr) = line.split("listen=").nth(1)
            {
                break format!("http://{}", addr.split_whitespace().next().unwrap());
            }
        };
        // Keep draining stderr so the broker never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Served { child, base, startup }
    }

    pub fn stop(mut self) {
        // SIGTERM: the graceful path.
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!("periscope serve did not stop on SIGTERM");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}
