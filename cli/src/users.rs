//! `periscope users`: people who sign in, managed on a data directory (the broker may be
//! running on it; its next call sees the change, and a disabled user's tokens fail on
//! it).

use std::io::BufRead as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Subcommand;

use periscope_broker::audit::Actor;
use periscope_broker::auth::Role;
use periscope_broker::keys::{DEFAULT_ORG, KeyStore};
use periscope_broker::oauth::admin::{self, UserChange};
use periscope_broker::oauth::config::OAuthSettings;
use periscope_broker::oauth::sqlite::SqliteOAuthStore;
use periscope_broker::oauth::store::{OAuthStore, UserRecord};
use periscope_broker::oauth::users::{NewUser, Passwords};
use periscope_broker::time::format_datetime;

/// `periscope users …`.
#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create a user who signs in through OAuth clients (password read from standard
    /// input with --password-stdin).
    Create(CreateArgs),
    /// List users.
    List(ListArgs),
    /// Disable a user: they cannot sign in and their tokens fail on the next call.
    Disable(UserArgs),
    /// Enable a disabled user again.
    Enable(UserArgs),
    /// Set a user's password (read from standard input).
    SetPassword(UserArgs),
}

/// The data directory.
#[derive(Debug, clap::Args)]
pub struct DirArg {
    /// The broker's data directory.
    #[arg(long, env = "PERISCOPE_DATA_DIR")]
    pub data_dir: PathBuf,
}

/// `users create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    #[command(flatten)]
    dir: DirArg,
    /// The sign-in name (letters, digits, `. _ @ + -`; an email address works).
    #[arg(long)]
    name: String,
    /// developer (default), group_admin (needs --group) or company_admin.
    #[arg(long, default_value = "developer")]
    role: String,
    /// The group (created when missing).
    #[arg(long)]
    group: Option<String>,
    /// Only these pools, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pools: Vec<String>,
    /// The organization [default: default] (created when missing).
    #[arg(long)]
    org: Option<String>,
    /// Read the password from the first line of standard input.
    #[arg(long, conflicts_with = "no_password")]
    password_stdin: bool,
    /// No password: the user signs in through the OpenID provider only.
    #[arg(long)]
    no_password: bool,
    /// Print the user as JSON.
    #[arg(long)]
    json: bool,
}

/// `users list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    dir: DirArg,
    /// Only this organization.
    #[arg(long)]
    org: Option<String>,
    /// JSON lines instead of a table.
    #[arg(long)]
    json: bool,
}

/// A command on one user.
#[derive(Debug, clap::Args)]
pub struct UserArgs {
    #[command(flatten)]
    dir: DirArg,
    /// The user's sign-in name or id (`usr_…`).
    user: String,
}

async fn open(dir: &Path) -> anyhow::Result<(SqliteOAuthStore, Passwords)> {
    // Creates the organization tables too, so a fresh directory works.
    KeyStore::open_cli(dir).await.with_context(|| format!("opening {}", dir.display()))?;
    let store = SqliteOAuthStore::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let s = OAuthSettings::default();
    Ok((store, Passwords::new(s.password_memory_kib, s.password_iterations)?))
}

fn read_password() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).context("reading the password from standard input")?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

async fn find(store: &SqliteOAuthStore, who: &str) -> anyhow::Result<UserRecord> {
    store
        .users()
        .await?
        .into_iter()
        .find(|u| u.user_id == who || u.name == who)
        .with_context(|| format!("no user `{who}`; `periscope users list` shows them"))
}

fn line(u: &UserRecord) -> String {
    format!(
        "{:<28} {:<30} {:<10} {:<14} {:<10} {:<9} {}",
        u.user_id,
        u.name,
        u.org,
        u.role.as_str(),
        u.group.as_deref().unwrap_or("-"),
        if u.active() { "active" } else { "disabled" },
        u.pools.as_ref().map(|p| p.join(",")).unwrap_or_else(|| "-".into())
    )
}

/// Runs a `periscope users` command; returns what to print.
pub async fn run(command: UsersCommand) -> anyhow::Result<String> {
    match command {
        UsersCommand::Create(a) => {
            let role = Role::parse(&a.role).with_context(|| {
                format!("--role `{}` must be one of {}", a.role, Role::ALL.map(|r| r.as_str()).join(", "))
            })?;
            if !a.password_stdin && !a.no_password {
                anyhow::bail!("give --password-stdin (and the password on standard input), or --no-password");
            }
            let password = if a.password_stdin { Some(read_password()?) } else { None };
            let (store, passwords) = open(&a.dir.data_dir).await?;
            let new = NewUser {
                name: a.name.trim().to_owned(),
                org: a.org.unwrap_or_else(|| DEFAULT_ORG.into()),
                role,
                group: a.group.clone(),
                pools: (!a.pools.is_empty()).then_some(a.pools),
                quotas: None,
                password,
            };
            if let Some(g) = &new.group {
                ensure_group(&a.dir.data_dir, &new.org, g).await?;
            }
            let user = admin::create(&store, &passwords, new, Actor::cli()).await?;
            if a.json {
                return Ok(serde_json::to_string(&user)?);
            }
            Ok(format!(
                "Created user `{}` ({}), role {}, organization {}{}. They sign in from any MCP client that supports \
                 OAuth (the broker needs [oauth] enabled = true).",
                user.name,
                user.user_id,
                user.role.as_str(),
                user.org,
                user.group.as_ref().map(|g| format!(", group {g}")).unwrap_or_default()
            ))
        }
        UsersCommand::List(a) => {
            let (store, _) = open(&a.dir.data_dir).await?;
            let users: Vec<UserRecord> =
                store.users().await?.into_iter().filter(|u| a.org.as_ref().is_none_or(|o| &u.org == o)).collect();
            if a.json {
                return Ok(users.iter().filter_map(|u| serde_json::to_string(u).ok()).collect::<Vec<_>>().join("\n"));
            }
            let mut out = format!(
                "{:<28} {:<30} {:<10} {:<14} {:<10} {:<9} {}\n",
                "ID", "NAME", "ORG", "ROLE", "GROUP", "STATUS", "POOLS"
            );
            for u in &users {
                out.push_str(&line(u));
                out.push('\n');
            }
            if users.is_empty() {
                out.push_str("(no users)\n");
            }
            Ok(out.trim_end().to_owned())
        }
        UsersCommand::Disable(a) => set(&a, UserChange { disabled: Some(true), ..Default::default() }).await,
        UsersCommand::Enable(a) => set(&a, UserChange { disabled: Some(false), ..Default::default() }).await,
        UsersCommand::SetPassword(a) => {
            let p = read_password()?;
            set(&a, UserChange { password: Some(p), ..Default::default() }).await
        }
    }
}

async fn set(a: &UserArgs, change: UserChange) -> anyhow::Result<String> {
    let (store, passwords) = open(&a.dir.data_dir).await?;
    let user = find(&store, a.user.trim()).await?;
    let next = admin::change(&store, &passwords, &user, change, Actor::cli(), |_| Ok(())).await?;
    let status = match next.disabled_at_ms {
        Some(t) => format!("disabled since {} (its tokens stop working on the broker's next call)", format_datetime(t)),
        None => "active".into(),
    };
    Ok(format!("User `{}` ({}): {status}.", next.name, next.user_id))
}

async fn ensure_group(dir: &Path, org: &str, group: &str) -> anyhow::Result<()> {
    let keys = KeyStore::open_cli(dir).await?;
    if !keys.current().tenancy.has_group(org, group) {
        keys.create_group(org, group, &Actor::cli()).await?;
    }
    Ok(())
}
