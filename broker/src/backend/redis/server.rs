//! A private `redis-server` on a free loopback port, for tests and benches: started in
//! a fresh directory with the append-only file on and snapshots off, stopped (and its
//! directory removed) when dropped. Debian's `redis-server` package provides the
//! binary (`scripts/test` installs it when missing).
//!
//! The server runs under a small shell that holds the other end of a pipe from this
//! process: when this process ends, however it ends, the pipe closes and the shell
//! kills the server, so no test leaves one behind.

use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server` owned by the caller.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<(Child, ChildStdin, u32)>,
    port: u16,
    dir: PathBuf,
}

/// Why a server could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The binary is missing or would not start.
    #[error("cannot start redis-server (install Debian's redis-server package): {0}")]
    Spawn(std::io::Error),
    /// It started but did not answer.
    #[error("redis-server on port {0} did not answer within 10 s")]
    Silent(u16),
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl RedisServer {
    /// Starts a server on a free loopback port.
    pub fn start() -> Result<RedisServer, ServerError> {
        let dir = std::env::temp_dir().join(format!("periscope-redis-{}", periscope_protocol::ActionId::generate()));
        std::fs::create_dir_all(&dir).map_err(ServerError::Spawn)?;
        let port = free_port().map_err(ServerError::Spawn)?;
        let mut server = RedisServer { child: None, port, dir };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<(), ServerError> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("redis-server \"$@\" >/dev/null 2>&1 & p=$!; echo $p; read _; kill -9 $p 2>/dev/null")
            .arg("sh")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
            .args(["--appendfsync", "always", "--dir"])
            .arg(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(ServerError::Spawn)?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            return Err(ServerError::Silent(self.port));
        };
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let Ok(pid) = line.trim().parse::<u32>() else {
            let _ = child.kill();
            return Err(ServerError::Silent(self.port));
        };
        self.child = Some((child, stdin, pid));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(ServerError::Silent(self.port))
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills it (as a crash would); its data stays in the directory.
    pub fn kill(&mut self) {
        if let Some((mut shell, stdin, pid)) = self.child.take() {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            drop(stdin);
            let _ = shell.wait();
        }
    }

    /// Starts it again on the same port and directory (it replays its append-only file).
    pub fn restart(&mut self) -> Result<(), ServerError> {
        self.kill();
        self.spawn()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
