//! The demo's Python shop (`demo/python/pyshop.py`): a plain-stdlib service run with
//! Periscope's Python agent attached (`python -m periscope_agent run -- ...`), in its own
//! pool, beside the Rust shops.
//!
//! It needs a CPython 3.9+ with the agent installed. `PERISCOPE_DEMO_PYTHON` names an
//! interpreter to use (one that already has `periscope_agent` is used as it is; `off`
//! leaves the Python shop out); else
//! `python3` is used to make a virtualenv under the build's target directory, into which
//! the agent is built and installed from this repository on first use. When none of
//! that is possible the demo runs without it and says why.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::{Child, Command};

use crate::demo::InstanceSpec;

/// The Python shop as the demo lists it.
pub const SPEC: InstanceSpec = InstanceSpec {
    name: "pyshop-eu-1",
    pool: "pyshop",
    tags: &["env:prod", "region:eu", "lang:python"],
    region: "eu-west",
};

/// The repository this binary was built from (for the shop's script and the agent's
/// sources).
fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// The Python shop's script.
pub fn script() -> PathBuf {
    repository().join("demo/python/pyshop.py")
}

/// A line worth a first snapshot in the Python shop: where `price_order` has its total.
pub fn example_line() -> Option<usize> {
    let text = std::fs::read_to_string(script()).ok()?;
    text.lines().position(|l| l.trim_start().starts_with("total_cents = subtotal")).map(|i| i + 1)
}

async fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stdin(Stdio::null()).stderr(Stdio::null()).output().await.ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `major.minor` of `python`, when it runs.
async fn version(python: &Path) -> Option<(u32, u32)> {
    let v = output(Command::new(python).args(["-c", "import sys; print('%d %d' % sys.version_info[:2])"])).await?;
    let mut parts = v.split_whitespace().map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

async fn has_agent(python: &Path) -> bool {
    output(Command::new(python).args(["-c", "import periscope_agent"])).await.is_some()
}

/// Finds or prepares an interpreter with the agent; `Err` says why there is none.
async fn interpreter(log_dir: &Path) -> Result<PathBuf, String> {
    let chosen = std::env::var_os("PERISCOPE_DEMO_PYTHON").map(PathBuf::from);
    if chosen.as_deref() == Some(Path::new("off")) {
        return Err("PERISCOPE_DEMO_PYTHON=off".into());
    }
    let python = chosen.clone().unwrap_or_else(|| PathBuf::from("python3"));
    match version(&python).await {
        Some(v) if v >= (3, 9) => {}
        Some((a, b)) => return Err(format!("{} is Python {a}.{b}; the agent needs 3.9 or later", python.display())),
        None => return Err(format!("no Python interpreter found ({} does not run)", python.display())),
    }
    if chosen.is_some() && has_agent(&python).await {
        return Ok(python);
    }
    let agent_src = repository().join("agent-python");
    if !agent_src.join("pyproject.toml").exists() {
        return Err(format!("the agent's sources are not at {}", agent_src.display()));
    }
    let target = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().and_then(Path::parent).map(Path::to_path_buf))
        .ok_or("cannot locate the build's target directory")?;
    let venv = target.join("python-demo").join("venv");
    let venv_python = venv.join("bin").join("python");
    if venv_python.exists() && has_agent(&venv_python).await {
        return Ok(venv_python);
    }
    println!(
        "Preparing the Python shop: building Periscope's Python agent into {} (first run only; a few minutes)...",
        venv.display()
    );
    let log_path = log_dir.join("pyshop-install.log");
    let log = std::fs::File::create(&log_path).map_err(|e| format!("cannot write {}: {e}", log_path.display()))?;
    let failed = |what: &str| format!("{what} failed (see {})", log_path.display());
    let stderr = log.try_clone().map_err(|e| e.to_string())?;
    let made = Command::new(&python)
        .args(["-m", "venv"])
        .arg(&venv)
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(stderr)
        .status()
        .await;
    if !made.is_ok_and(|s| s.success()) {
        return Err(failed("creating the virtualenv"));
    }
    let installed = Command::new(&venv_python)
        .args(["-m", "pip", "install", "--disable-pip-version-check", "--quiet"])
        .arg(&agent_src)
        .env("CARGO_TARGET_DIR", &target)
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .status()
        .await;
    if !installed.is_ok_and(|s| s.success()) {
        return Err(failed("installing the agent (it builds with maturin from PyPI and cargo)"));
    }
    Ok(venv_python)
}

/// Starts the Python shop with its agent, or says why it cannot and returns `None`.
pub async fn start(addr: SocketAddr, agent_key: &str, log_dir: &Path, rps: f64) -> Option<Child> {
    let script = script();
    if !script.exists() {
        println!("Python shop: skipped ({} is not there: run the demo from the repository).", script.display());
        return None;
    }
    let python = match interpreter(log_dir).await {
        Ok(p) => p,
        Err(why) => {
            println!("Python shop: skipped: {why}. The Rust shops run as usual.");
            return None;
        }
    };
    let log = std::fs::File::create(log_dir.join(format!("{}.log", SPEC.name))).ok()?;
    let child = Command::new(&python)
        .args(["-m", "periscope_agent", "run", "--"])
        .arg(&python)
        .arg(&script)
        .arg(rps.max(0.5).to_string())
        .env("PERISCOPE_BROKER_URL", format!("ws://{addr}/agents"))
        .env("PERISCOPE_AGENT_KEY", agent_key)
        .env("PERISCOPE_POOL", SPEC.pool)
        .env("PERISCOPE_TAGS", SPEC.tags.join(","))
        .env("PERISCOPE_SERVICE", "pyshop")
        .env("PERISCOPE_DISPLAY_NAME", SPEC.name)
        .env_remove("PERISCOPE_API_KEY")
        .stdin(Stdio::piped())
        .stdout(log.try_clone().ok()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn();
    match child {
        Ok(c) => Some(c),
        Err(e) => {
            println!("Python shop: skipped: cannot start {}: {e}", python.display());
            None
        }
    }
}
