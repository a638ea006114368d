//! The admin tests' harness: a proxy with its console and HTTP endpoint started in-process,
//! the console users and token they log in with, and readers of the console's answers.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lockguard::admin::{Admin, ConfigSource};
use lockguard_config::{AdminRole, AdminUser, Config};
use lockguard_sandbox::named_rows;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use crate::app::App;
use crate::cluster::TestCluster;
use crate::guard_support;
use crate::http::Request;
use crate::prometheus;
use crate::proxy::{config_for, TestProxy};

pub const OPS: (&str, &str) = ("ops", "ops-secret");
pub const WATCHER: (&str, &str) = ("watcher", "watch-secret");
pub const API_TOKEN: &str = "test-api-token";
pub const WAIT: Duration = Duration::from_secs(10);

/// A proxy started in-process with its admin port (console and HTTP both on); dropping it
/// stops everything.
pub struct Running {
    pub addr: SocketAddr,
    pub console: SocketAddr,
    pub http: SocketAddr,
    pub admin: Arc<Admin>,
    pub proxy: TestProxy,
}

impl Running {
    /// An application session on `db` through the proxy, as the ordinary role.
    pub async fn app(&self, db: &str) -> App {
        App::connect(
            self.addr,
            guard_support::app_role(TestCluster::shared()),
            db,
        )
        .await
    }

    /// `GET /metrics`, parsed strictly.
    pub async fn metrics(&self) -> BTreeMap<String, f64> {
        prometheus::scrape(self.http).await
    }
}

impl From<TestProxy> for Running {
    fn from(proxy: TestProxy) -> Running {
        Running {
            addr: proxy.addr,
            console: proxy.console.expect("console enabled"),
            http: proxy.http.expect("HTTP enabled"),
            admin: Arc::clone(proxy.admin()),
            proxy,
        }
    }
}

pub async fn start(config: Config, source: Option<ConfigSource>) -> Running {
    let options = TestProxy::options(config);
    let options = match source {
        Some(source) => options.source(source),
        None => options,
    };
    options.start().await.into()
}

pub fn user(name: &str, password: &str, role: AdminRole) -> AdminUser {
    AdminUser {
        name: name.to_owned(),
        password: Some(password.to_owned()),
        password_env: None,
        role,
    }
}

/// The guard logs in as the role `lockguard setup-sql` creates (no superuser), as deployed.
pub fn guard_dsn(cluster: &TestCluster, port: u16) -> String {
    format!(
        "host={} port={port} user={} dbname=postgres",
        cluster.host(),
        guard_support::guard_role(cluster)
    )
}

/// A proxy config with the guard protecting `protected` (the idle rule off: only operators
/// kill here), console users `ops` (admin) and `watcher` (monitor), and an API token.
pub fn admin_config(protected: &[&str]) -> Config {
    let cluster = TestCluster::shared();
    let mut config = config_for(cluster);
    config.guard.dsn = Some(guard_dsn(cluster, cluster.port()));
    config.guard.protected_tables = protected.iter().map(|p| (*p).to_owned()).collect();
    config.guard.sweep_interval = Duration::from_millis(100);
    config.guard.idle_in_transaction_timeout = Duration::ZERO;
    config.admin.users = vec![
        user(OPS.0, OPS.1, AdminRole::Admin),
        user(WATCHER.0, WATCHER.1, AdminRole::Monitor),
    ];
    config.admin.api_token = Some(API_TOKEN.to_owned());
    config
}

/// A config file for the test cluster: guard on with `protected`, quick idle rule, admin on
/// free ports with the `ops` user, plus `extra` sections.
pub fn config_text(protected: &str, extra: &str) -> String {
    let cluster = TestCluster::shared();
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"{host}:{port}\"\n\
         [guard]\ndsn = \"{dsn}\"\nprotected_tables = [{protected}]\n\
         idle_in_transaction_timeout = \"300ms\"\nsweep_interval = \"100ms\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n\
         [[admin.users]]\nname = \"{}\"\npassword = \"{}\"\nrole = \"admin\"\n{extra}",
        OPS.0,
        OPS.1,
        host = cluster.host(),
        port = cluster.port(),
        dsn = guard_dsn(cluster, cluster.port()),
    )
}

/// Starts a proxy from `file`, RELOAD re-reading it.
pub async fn start_from_file(file: &std::path::Path) -> Running {
    TestProxy::start_from_file(file).await.into()
}

/// A fresh database with the guard tests' tables (`app.user_sessions`, `app.scratch`).
pub async fn database(prefix: &str) -> String {
    guard_support::guard_test_database(TestCluster::shared(), prefix).await
}

/// A superuser connection straight to PostgreSQL.
pub async fn direct(db: &str) -> Client {
    guard_support::connect(TestCluster::shared(), db).await
}

/// A console session; the error is returned so refusals can be checked.
pub async fn console(
    running: &Running,
    login: (&str, &str),
) -> Result<Client, tokio_postgres::Error> {
    console_at(running.console, login).await
}

/// A console session over plaintext to the console at `addr`.
pub async fn console_at(
    addr: SocketAddr,
    (name, password): (&str, &str),
) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(addr.port())
        .user(name)
        .password(password)
        .dbname("lockguard")
        .connect_timeout(WAIT)
        .connect(NoTls)
        .await?;
    tokio::spawn(conn);
    Ok(client)
}

// ---- reading answers --------------------------------------------------------------------

/// The answer to a simple query; panics with the statement if it fails.
async fn answer(client: &Client, sql: &str) -> Vec<SimpleQueryMessage> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
}

/// The rows of a simple query as column name → text (NULL absent).
pub async fn rows(client: &Client, sql: &str) -> Vec<HashMap<String, String>> {
    named_rows(&answer(client, sql).await)
        .into_iter()
        .map(|row| {
            row.into_iter()
                .filter_map(|(name, value)| Some((name, value?)))
                .collect()
        })
        .collect()
}

/// The column names of `sql`'s answer as the console describes them (also with no rows).
pub async fn column_names(client: &Client, sql: &str) -> Vec<String> {
    answer(client, sql)
        .await
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::RowDescription(columns) => {
                Some(columns.iter().map(|c| c.name().to_owned()).collect())
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no RowDescription"))
}

/// `SHOW STATS` as counter name → value.
pub async fn stats(client: &Client) -> HashMap<String, i64> {
    rows(client, "SHOW STATS")
        .await
        .into_iter()
        .map(|row| {
            let value = row["value"]
                .parse()
                .unwrap_or_else(|e| panic!("{row:?}: {e}"));
            (row["name"].clone(), value)
        })
        .collect()
}

pub fn code_of(e: &tokio_postgres::Error) -> Option<&SqlState> {
    e.as_db_error().map(|db| db.code())
}

/// One HTTP/1.1 exchange on a fresh connection, addressed to `addr` by IP as a scraper would
/// (without a token the endpoint answers names with 421): (status, headers, body).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, BTreeMap<String, String>, String) {
    let response = Request::new(method, path).token(token).send(addr).await;
    (response.status, response.headers, response.body)
}

/// The series of operator kills that terminated a backend.
pub const OPERATOR_KILLS: &str =
    "lockguard_terminations_total{outcome=\"terminated\",trigger=\"operator\"}";

/// A port nothing listens on (bound, then released).
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    listener.local_addr().expect("address").port()
}
