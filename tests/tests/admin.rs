//! The admin port (issue 4), against the real cluster: the psql console (simple and extended
//! protocol, SCRAM and MD5 logins, roles), KILL through the guard's verified terminate, RELOAD
//! of a real config file, and the HTTP endpoint (Prometheus metrics, readiness, JSON API).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lockguard::admin::{Admin, ConfigSource};
use lockguard::Proxy;
use lockguard_config::{AdminAuthMethod, AdminRole, AdminUser, Config};
use lockguard_tests::cluster::TestCluster;
use lockguard_tests::guard_support::{self, backend_alive, wait_until_waiting};
use lockguard_tests::proxy::{config_for, init_test_logging};
use lockguard_tests::psql;
use lockguard_tests::raw::{self, Received};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};
use tokio_util::sync::CancellationToken;

const OPS: (&str, &str) = ("ops", "ops-secret");
const WATCHER: (&str, &str) = ("watcher", "watch-secret");
const API_TOKEN: &str = "test-api-token";
const WAIT: Duration = Duration::from_secs(10);

// ---- setting up -------------------------------------------------------------------------

/// A proxy started in-process with its admin port; dropping it stops everything.
struct Running {
    addr: SocketAddr,
    console: SocketAddr,
    http: SocketAddr,
    admin: Arc<Admin>,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.hard_stop.cancel();
    }
}

async fn start(config: Config, source: Option<ConfigSource>) -> Running {
    init_test_logging();
    let proxy = Proxy::bind_with_source(config, source)
        .await
        .expect("bind the proxy");
    let running = Running {
        addr: proxy.local_addr().expect("proxy address"),
        console: proxy.admin_console_addr().expect("console enabled"),
        http: proxy.admin_http_addr().expect("HTTP enabled"),
        admin: proxy.admin(),
        shutdown: proxy.shutdown_token(),
        hard_stop: proxy.hard_stop_token(),
    };
    tokio::spawn(proxy.run());
    running
}

fn user(name: &str, password: &str, role: AdminRole) -> AdminUser {
    AdminUser {
        name: name.to_owned(),
        password: Some(password.to_owned()),
        password_env: None,
        role,
    }
}

/// The guard logs in as the role `lockguard setup-sql` creates (no superuser), as deployed.
fn guard_dsn(cluster: &TestCluster, port: u16) -> String {
    format!(
        "host={} port={port} user={} dbname=postgres",
        cluster.host(),
        guard_support::guard_role(cluster)
    )
}

/// A proxy config with the guard protecting `protected` (the idle rule off: only operators
/// kill here), console users `ops` (admin) and `watcher` (monitor), and an API token.
fn admin_config(protected: &[&str]) -> Config {
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
fn config_text(protected: &str, extra: &str) -> String {
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
async fn start_from_file(file: &std::path::Path) -> Running {
    let source = ConfigSource {
        path: Some(file.to_owned()),
        overrides: Default::default(),
    };
    let config = source.load().expect("config file loads");
    start(config, Some(source)).await
}

/// A fresh database with the guard tests' tables (`app.user_sessions`, `app.scratch`).
async fn database(prefix: &str) -> String {
    guard_support::guard_test_database(TestCluster::shared(), prefix).await
}

/// A superuser connection straight to PostgreSQL.
async fn direct(db: &str) -> Client {
    guard_support::connect(TestCluster::shared(), db).await
}

/// A console session; the error is returned so refusals can be checked.
async fn console(
    running: &Running,
    (name, password): (&str, &str),
) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(running.console.port())
        .user(name)
        .password(password)
        .dbname("lockguard")
        .connect_timeout(WAIT)
        .connect(NoTls)
        .await?;
    tokio::spawn(conn);
    Ok(client)
}

/// An application session through the proxy on a raw socket, so the test can read the FATAL
/// lockguard sends when it ends the session.
struct App {
    stream: TcpStream,
    pid: i32,
}

impl App {
    async fn connect(running: &Running, db: &str) -> App {
        let mut stream = TcpStream::connect(running.addr).await.expect("connect");
        // An ordinary role: the guard's role may not signal a superuser's backend.
        let login = raw::login(
            &mut stream,
            guard_support::app_role(TestCluster::shared()),
            db,
        )
        .await;
        let key = login
            .iter()
            .find(|m| m.tag == b'K')
            .expect("BackendKeyData");
        let pid = i32::from_be_bytes([key.body[0], key.body[1], key.body[2], key.body[3]]);
        App { stream, pid }
    }

    /// Runs `sql` up to ReadyForQuery, asserting it did not fail.
    async fn exec(&mut self, sql: &str) {
        self.stream
            .write_all(&raw::query(sql))
            .await
            .expect("send query");
        loop {
            let m = raw::read_message(&mut self.stream, WAIT)
                .await
                .unwrap_or_else(|| panic!("no answer to {sql:?}"));
            assert_ne!(m.tag, b'E', "{sql}: {:?}", m.error_fields());
            if m.tag == b'Z' {
                return;
            }
        }
    }

    /// The ErrorResponse the proxy sends when it ends the session unasked.
    async fn farewell(&mut self) -> (String, String) {
        let m: Received = raw::read_message(&mut self.stream, WAIT)
            .await
            .expect("an ErrorResponse before the close");
        assert_eq!(m.tag, b'E', "{m:?}");
        m.error_fields()
    }
}

// ---- reading answers --------------------------------------------------------------------

/// The rows of a simple query as column name → text (NULL absent).
async fn rows(client: &Client, sql: &str) -> Vec<HashMap<String, String>> {
    let messages = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                row.columns()
                    .iter()
                    .enumerate()
                    .filter_map(|(i, c)| Some((c.name().to_owned(), row.get(i)?.to_owned())))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// The column names of `sql`'s answer as the console describes them (also with no rows).
async fn column_names(client: &Client, sql: &str) -> Vec<String> {
    let messages = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    messages
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
async fn stats(client: &Client) -> HashMap<String, i64> {
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

fn code_of(e: &tokio_postgres::Error) -> Option<&SqlState> {
    e.as_db_error().map(|db| db.code())
}

/// One HTTP/1.1 exchange on a fresh connection, addressed to `addr` by IP as a scraper would
/// (without a token the endpoint answers names with 421): (status, headers, body).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, BTreeMap<String, String>, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect to HTTP");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("HTTP answer in time")
        .expect("read HTTP answer");
    let text = String::from_utf8(raw).expect("UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("header end");
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = if headers.get("transfer-encoding").map(String::as_str) == Some("chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, headers, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("chunk size line");
        let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

// ---- a strict Prometheus text parser ----------------------------------------------------

/// Samples by `name{label="value",...}` (labels sorted), after checking the exposition
/// format: HELP/TYPE lines, names, label syntax and escapes, numeric values, every sample
/// belonging to a declared family of the right type, no duplicate series, cumulative
/// histogram buckets ending in `+Inf` equal to `_count`.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    assert!(
        text.ends_with('\n'),
        "the exposition must end with a newline"
    );
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashMap<String, String> = HashMap::new();
    let mut samples = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let at = format!("line {}: {line:?}", n + 1);
        if let Some(comment) = line.strip_prefix('#') {
            let mut parts = comment.trim_start().splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("HELP"), Some(name), Some(help)) => {
                    assert!(valid_metric_name(name), "{at}");
                    assert!(
                        helps.insert(name.to_owned(), help.to_owned()).is_none(),
                        "second HELP, {at}"
                    );
                }
                (Some("TYPE"), Some(name), Some(kind)) => {
                    assert!(valid_metric_name(name), "{at}");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "{at}"
                    );
                    assert!(
                        types.insert(name.to_owned(), kind.to_owned()).is_none(),
                        "second TYPE, {at}"
                    );
                }
                _ => {}
            }
            continue;
        }
        assert!(!line.trim().is_empty(), "blank line, {at}");
        let (series, value) = parse_sample(line).unwrap_or_else(|e| panic!("{e}, {at}"));
        let name = series.split('{').next().unwrap_or_default().to_owned();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let base = name.strip_suffix(suffix)?;
                matches!(
                    types.get(base).map(String::as_str),
                    Some("histogram" | "summary")
                )
                .then(|| base.to_owned())
            })
            .unwrap_or_else(|| name.clone());
        assert!(types.contains_key(&family), "sample before its TYPE, {at}");
        if types[&family] == "counter" {
            assert!(value >= 0.0, "negative counter, {at}");
        }
        assert!(
            samples.insert(series, value).is_none(),
            "duplicate series, {at}"
        );
    }
    for (family, kind) in &types {
        if kind != "histogram" {
            continue;
        }
        let mut buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter_map(|(series, v)| {
                let le = series
                    .strip_prefix(&format!("{family}_bucket{{le=\""))?
                    .strip_suffix("\"}")?;
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((bound, *v))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{family} buckets not cumulative"
        );
        let last = buckets
            .last()
            .unwrap_or_else(|| panic!("{family} has no buckets"));
        assert!(last.0.is_infinite(), "{family} has no +Inf bucket");
        assert_eq!(
            Some(&last.1),
            samples.get(&format!("{family}_count")),
            "{family} +Inf != count"
        );
        assert!(
            samples.contains_key(&format!("{family}_sum")),
            "{family} has no _sum"
        );
    }
    samples
}

fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `name{a="x",b="y"} value` → (`name{a="x",b="y"}` with labels sorted, value).
fn parse_sample(line: &str) -> Result<(String, f64), String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    if !valid_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let mut label = String::new();
        loop {
            let (i, c) = chars.next().ok_or("unterminated labels")?;
            match c {
                '}' if label.is_empty() => {
                    rest = &inner[i + 1..];
                    break;
                }
                '=' => {
                    if !valid_metric_name(&label) || label.contains(':') {
                        return Err(format!("bad label name {label:?}"));
                    }
                    if chars.next().map(|(_, c)| c) != Some('"') {
                        return Err("label value not quoted".into());
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next().ok_or("unterminated label value")?.1 {
                            '"' => break,
                            '\\' => match chars.next().ok_or("dangling escape")?.1 {
                                '\\' => value.push('\\'),
                                '"' => value.push('"'),
                                'n' => value.push('\n'),
                                other => return Err(format!("bad escape \\{other}")),
                            },
                            '\n' => return Err("newline in label value".into()),
                            other => value.push(other),
                        }
                    }
                    labels.push((std::mem::take(&mut label), value));
                    match chars.next().ok_or("unterminated labels")? {
                        (_, ',') => {}
                        (j, '}') => {
                            rest = &inner[j + 1..];
                            break;
                        }
                        (_, other) => return Err(format!("unexpected {other:?} after a label")),
                    }
                }
                c => label.push(c),
            }
        }
    }
    let mut fields = rest.split(' ').filter(|f| !f.is_empty());
    let value = fields.next().ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse::<f64>().map_err(|_| format!("bad value {v:?}"))?,
    };
    if let Some(timestamp) = fields.next() {
        timestamp
            .parse::<i64>()
            .map_err(|_| format!("bad timestamp {timestamp:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".into());
    }
    labels.sort();
    let series = if labels.is_empty() {
        name.to_owned()
    } else {
        let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
        format!("{name}{{{}}}", inner.join(","))
    };
    Ok((series, value))
}

async fn metrics(running: &Running) -> BTreeMap<String, f64> {
    let (status, headers, body) = http(running.http, "GET", "/metrics", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        headers
            .get("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{headers:?}"
    );
    parse_prometheus(&body)
}

const OPERATOR_KILLS: &str =
    "lockguard_terminations_total{outcome=\"terminated\",trigger=\"operator\"}";

// ---- the tests --------------------------------------------------------------------------

/// Acceptance 1 and 4 (metrics): SHOW CLIENTS lists both proxied sessions with their real
/// pids and states (simple and extended protocol); SHOW LOCKS shows the protected lock and its
/// waiter; KILL ends exactly one backend, its client gets lockguard's 57P01, the waiter
/// proceeds, SHOW EVENTS and the termination counter record it; the HTTP API lists clients
/// and kills with the token only.
#[tokio::test]
async fn console_lists_clients_and_kill_ends_exactly_one_backend() {
    let db = database("admin_kill").await;
    let running = start(admin_config(&["app.user_sessions"]), None).await;
    let checker = direct(&db).await;

    let mut holder = App::connect(&running, &db).await;
    holder.exec("BEGIN").await;
    holder
        .exec("UPDATE app.user_sessions SET token = 'x' WHERE id = 1")
        .await;
    let mut bystander = App::connect(&running, &db).await;
    bystander.exec("SELECT 1").await;
    // Someone who needs the row: blocked until the holder's backend is gone.
    let waiter_client = direct(&db).await;
    let waiter_pid: i32 = waiter_client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let waiter = tokio::spawn(async move {
        waiter_client
            .execute("UPDATE app.user_sessions SET token = 'w' WHERE id = 1", &[])
            .await
    });
    wait_until_waiting(&checker, waiter_pid).await;

    let ops = console(&running, OPS).await.expect("ops logs in");
    let clients = rows(&ops, "show clients;").await;
    assert_eq!(clients.len(), 2, "{clients:?}");
    let row_of = |pid: i32| {
        clients
            .iter()
            .find(|r| r.get("backend_pid") == Some(&pid.to_string()))
            .unwrap_or_else(|| panic!("no row for backend {pid}: {clients:?}"))
            .clone()
    };
    let (holder_row, bystander_row) = (row_of(holder.pid), row_of(bystander.pid));
    assert_eq!(holder_row["state"], "idle in transaction");
    assert_eq!(bystander_row["state"], "idle");
    assert_eq!(holder_row["database"], db);
    assert_eq!(holder_row["client_addr"], "127.0.0.1");
    assert_eq!(holder_row["protected_locks"], "1");
    assert_eq!(holder_row["waiters"], "1");
    assert_eq!(bystander_row["protected_locks"], "0");
    assert!(holder_row.contains_key("xact_age_s") && !bystander_row.contains_key("xact_age_s"));
    assert!(holder_row["last_statement"].contains("UPDATE app.user_sessions"));

    let locks = rows(&ops, "SHOW LOCKS").await;
    assert_eq!(locks.len(), 1, "{locks:?}");
    assert_eq!(locks[0]["backend_pid"], holder.pid.to_string());
    assert_eq!(locks[0]["table"], "app.user_sessions");
    assert_eq!(locks[0]["mode"], "RowExclusiveLock");
    assert_eq!(locks[0]["waiters"], "1");

    // The extended protocol, typed columns (binary results).
    let typed = ops
        .query("SHOW CLIENTS", &[])
        .await
        .expect("prepared SHOW CLIENTS");
    let mut by_pid: HashMap<i32, (i64, String)> = HashMap::new();
    for row in &typed {
        let pid: Option<i32> = row.get("backend_pid");
        by_pid.insert(pid.expect("backend pid"), (row.get("id"), row.get("state")));
    }
    let holder_id = by_pid[&holder.pid].0;
    assert_eq!(holder_id.to_string(), holder_row["id"]);
    assert_eq!(by_pid[&bystander.pid].1, "idle");
    let version = ops.prepare("SHOW VERSION").await.expect("prepare");
    assert_eq!(version.columns()[0].name(), "version");
    let v: String = ops.query_one(&version, &[]).await.expect("version").get(0);
    assert!(v.starts_with("lockguard "), "{v}");

    let before = metrics(&running).await;
    assert_eq!(before.get(OPERATOR_KILLS), Some(&0.0), "{before:?}");
    assert_eq!(before.get("lockguard_clients_active"), Some(&2.0));
    assert_eq!(
        before.get("lockguard_clients{state=\"idle in transaction\"}"),
        Some(&1.0)
    );

    let answer = rows(&ops, &format!("KILL {holder_id}")).await;
    assert_eq!(answer.len(), 1, "{answer:?}");
    assert_eq!(answer[0]["outcome"], "terminated", "{answer:?}");
    assert_eq!(answer[0]["backend_pid"], holder.pid.to_string());

    let (code, message) = holder.farewell().await;
    assert_eq!(code, "57P01");
    assert!(
        message.starts_with("lockguard: terminated by operator"),
        "{message}"
    );
    assert!(message.contains("operator"), "{message}");
    assert!(
        !backend_alive(&checker, holder.pid).await,
        "the killed backend is gone"
    );
    assert!(
        backend_alive(&checker, bystander.pid).await,
        "the other survives"
    );
    bystander.exec("SELECT 2").await;
    let updated = tokio::time::timeout(WAIT, waiter)
        .await
        .expect("the waiter proceeds")
        .expect("waiter task");
    assert_eq!(updated.expect("the waiter's update"), 1);

    let events = rows(&ops, "SHOW EVENTS").await;
    let newest = events.first().expect("an event");
    assert_eq!(newest["trigger"], "operator");
    assert_eq!(newest["outcome"], "terminated");
    assert_eq!(newest["backend_pid"], holder.pid.to_string());
    assert_eq!(newest["client_id"], holder_id.to_string());
    assert!(newest["cause"].contains("ops"), "{newest:?}");
    assert_eq!(newest["locks"], "RowExclusiveLock on app.user_sessions");

    let after = metrics(&running).await;
    assert_eq!(after.get(OPERATOR_KILLS), Some(&1.0), "{after:?}");

    // The JSON API: the same table, the token guards it, and kill works over HTTP.
    let (status, _, _) = http(running.http, "GET", "/api/clients", None).await;
    assert_eq!(status, 401);
    let (status, _, _) = http(running.http, "GET", "/api/clients", Some("wrong")).await;
    assert_eq!(status, 403);
    let (status, _, body) = http(running.http, "GET", "/api/clients", Some(API_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let listed = json(&body);
    let listed = listed.as_array().expect("array");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["backend_pid"], bystander.pid);
    let bystander_id = listed[0]["id"].as_u64().expect("numeric id");
    let (status, _, body) = http(running.http, "GET", "/api/events", Some(API_TOKEN)).await;
    assert_eq!(status, 200);
    assert_eq!(json(&body)[0]["backend_pid"], holder.pid);

    let kill_path = format!("/api/clients/{bystander_id}/kill");
    let (status, headers, _) = http(running.http, "POST", &kill_path, None).await;
    assert_eq!(status, 401);
    assert_eq!(
        headers.get("www-authenticate").map(String::as_str),
        Some("Bearer")
    );
    let (status, _, _) = http(running.http, "POST", &kill_path, Some("nope")).await;
    assert_eq!(status, 403);
    assert!(
        backend_alive(&checker, bystander.pid).await,
        "refused kills do nothing"
    );
    let (status, _, body) = http(running.http, "POST", &kill_path, Some(API_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["outcome"], "terminated");
    let (code, _) = bystander.farewell().await;
    assert_eq!(code, "57P01");
    let (status, _, _) = http(running.http, "POST", &kill_path, Some(API_TOKEN)).await;
    assert_eq!(status, 404, "the session is gone");
    assert_eq!(metrics(&running).await.get(OPERATOR_KILLS), Some(&2.0));

    // KILL PID of a backend lockguard does not serve.
    let answer = rows(&ops, "KILL PID 999999").await;
    assert_eq!(answer[0]["outcome"], "not found");
}

/// Acceptance 2: monitors cannot KILL (or RELOAD, or SET), wrong passwords are refused for
/// SCRAM and MD5 logins, an unknown command is 42601 with the command list as hint.
#[tokio::test]
async fn roles_passwords_and_unknown_commands() {
    let running = start(admin_config(&[]), None).await;

    let watcher = console(&running, WATCHER).await.expect("watcher logs in");
    assert!(rows(&watcher, "SHOW CLIENTS").await.is_empty());
    for command in ["KILL 1", "KILL PID 1234", "RELOAD", "SET dry_run = on"] {
        let e = watcher.simple_query(command).await.expect_err(command);
        assert_eq!(
            code_of(&e),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{command}: {e:?}"
        );
    }
    // The session carries on after an error.
    assert_eq!(rows(&watcher, "SHOW VERSION").await.len(), 1);

    for bad in [(OPS.0, "wrong"), (WATCHER.0, OPS.1), ("nobody", "x")] {
        let e = console(&running, bad).await.expect_err("wrong password");
        assert_eq!(
            code_of(&e),
            Some(&SqlState::INVALID_PASSWORD),
            "{bad:?}: {e:?}"
        );
    }

    let ops = console(&running, OPS).await.expect("ops logs in");
    let e = ops
        .simple_query("SELECT 1")
        .await
        .expect_err("not a command");
    let db = e.as_db_error().expect("ErrorResponse");
    assert_eq!(db.code(), &SqlState::SYNTAX_ERROR);
    assert!(
        db.hint()
            .is_some_and(|h| h.contains("SHOW CLIENTS") && h.contains("KILL")),
        "{db:?}"
    );
    let e = ops
        .prepare("DROP TABLE x")
        .await
        .expect_err("not a command");
    assert_eq!(code_of(&e), Some(&SqlState::SYNTAX_ERROR));

    let set = rows(&ops, "SET dry_run = on").await;
    assert_eq!(
        (set[0]["value"].as_str(), set[0]["previous"].as_str()),
        ("on", "off")
    );
    let config = rows(&ops, "SHOW CONFIG").await;
    let dry_run = config
        .iter()
        .find(|r| r["key"] == "guard.dry_run")
        .expect("dry_run row");
    assert_eq!(dry_run["value"], "true");
    let token = config
        .iter()
        .find(|r| r["key"] == "admin.api_token")
        .expect("token row");
    assert_ne!(token["value"], API_TOKEN, "secrets are masked");
    assert!(running.admin.guard().expect("guard").rules().dry_run);

    // Password-less admin logins on loopback when trusted; without a token the API is
    // read-only.
    let mut trusting = admin_config(&[]);
    trusting.admin.users.clear();
    trusting.admin.trust_loopback = true;
    trusting.admin.api_token = None;
    let trusting = start(trusting, None).await;
    let anyone = console(&trusting, ("anyone", ""))
        .await
        .expect("trusted login");
    assert_eq!(rows(&anyone, "KILL 12345").await[0]["outcome"], "not found");
    let (status, _, body) = http(trusting.http, "GET", "/api/clients", None).await;
    assert_eq!((status, body.as_str()), (200, "[]"));
    let (status, _, _) = http(trusting.http, "POST", "/api/clients/1/kill", None).await;
    assert_eq!(status, 403);

    // MD5 on the wire.
    let mut md5 = admin_config(&[]);
    md5.admin.auth_method = AdminAuthMethod::Md5;
    let md5 = start(md5, None).await;
    let ops = console(&md5, OPS).await.expect("md5 login");
    assert!(!rows(&ops, "SHOW STATS").await.is_empty());
    let e = console(&md5, (OPS.0, "wrong"))
        .await
        .expect_err("wrong md5 password");
    assert_eq!(code_of(&e), Some(&SqlState::INVALID_PASSWORD), "{e:?}");
}

/// Acceptance 3: RELOAD after editing `protected_tables` in the file makes the guard act on
/// the new table, with no client reconnecting; an invalid file is refused and changes nothing.
#[tokio::test]
async fn reload_makes_the_guard_protect_a_new_table_without_reconnecting() {
    let db = database("admin_reload").await;
    let checker = direct(&db).await;
    let file = tempfile::NamedTempFile::new().expect("temp config file");
    let write_config = |protected: &str| {
        std::fs::write(file.path(), config_text(protected, "")).expect("write config");
    };
    write_config("\"app.user_sessions\"");
    let running = start_from_file(file.path()).await;
    let ops = console(&running, OPS).await.expect("ops logs in");

    let mut holder = App::connect(&running, &db).await;
    holder.exec("BEGIN").await;
    holder
        .exec("SELECT * FROM app.scratch WHERE id = 1 FOR UPDATE")
        .await;
    let mut other = App::connect(&running, &db).await;
    other.exec("SELECT 1").await;
    // Not protected: the guard sees no protected lock, and the holder stays.
    assert!(rows(&ops, "SHOW LOCKS").await.is_empty());

    // A broken file: refused, nothing changes.
    std::fs::write(file.path(), "[guard]\nprotected_tables = [\n").expect("write");
    let e = ops.simple_query("RELOAD").await.expect_err("invalid file");
    assert_eq!(code_of(&e), Some(&SqlState::CONFIG_FILE_ERROR), "{e:?}");
    let kept = rows(&ops, "SHOW CONFIG").await;
    let protected = kept
        .iter()
        .find(|r| r["key"] == "guard.protected_tables")
        .expect("protected_tables row");
    assert!(
        protected["value"].contains("app.user_sessions"),
        "{protected:?}"
    );
    assert!(backend_alive(&checker, holder.pid).await);

    write_config("\"app.scratch\"");
    let changes = rows(&ops, "RELOAD").await;
    let change = changes
        .iter()
        .find(|r| r["key"] == "guard.protected_tables")
        .unwrap_or_else(|| panic!("{changes:?}"));
    assert_eq!(change["status"], "applied");
    assert!(change["new_value"].contains("app.scratch"), "{change:?}");

    // The guard now judges the lock on app.scratch: the idle rule ends the holder's session.
    let (code, message) = holder.farewell().await;
    assert_eq!(code, "57P01");
    assert!(message.contains("app.scratch"), "{message}");
    assert!(!backend_alive(&checker, holder.pid).await);
    // The other session, connected before the reload, carries on.
    other.exec("SELECT 2").await;
    let events = rows(&ops, "SHOW EVENTS").await;
    assert_eq!(events[0]["trigger"], "idle_in_transaction");
    assert!(events[0]["locks"].contains("app.scratch"), "{events:?}");
}

/// RELOAD applies to console users already logged in: a demoted admin may only SHOW from the
/// next command on, and a removed user's session ends with FATAL 28000.
#[tokio::test]
async fn reload_demotes_and_removes_logged_in_console_users() {
    let file = tempfile::NamedTempFile::new().expect("temp config file");
    let write_config = |watcher: Option<&str>| {
        let extra = watcher
            .map(|role| {
                format!(
                    "[[admin.users]]\nname = \"{}\"\npassword = \"{}\"\nrole = \"{role}\"\n",
                    WATCHER.0, WATCHER.1
                )
            })
            .unwrap_or_default();
        std::fs::write(file.path(), config_text("\"app.user_sessions\"", &extra))
            .expect("write config");
    };
    write_config(Some("admin"));
    let running = start_from_file(file.path()).await;
    let ops = console(&running, OPS).await.expect("ops logs in");
    let watcher = console(&running, WATCHER).await.expect("watcher logs in");
    rows(&watcher, "SET dry_run = off").await;

    write_config(Some("monitor"));
    rows(&ops, "RELOAD").await;
    let e = watcher
        .simple_query("SET dry_run = off")
        .await
        .expect_err("a monitor may not change settings");
    assert_eq!(
        code_of(&e),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{e:?}"
    );
    assert_eq!(rows(&watcher, "SHOW VERSION").await.len(), 1);

    write_config(None);
    rows(&ops, "RELOAD").await;
    let e = watcher
        .simple_query("SHOW VERSION")
        .await
        .expect_err("a removed user's session ends");
    assert_eq!(
        code_of(&e),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{e:?}"
    );
    let message = e.as_db_error().map(|db| db.message()).unwrap_or_default();
    assert!(message.contains("no longer configured"), "{e:?}");
    let deadline = tokio::time::Instant::now() + WAIT;
    while !watcher.is_closed() {
        assert!(tokio::time::Instant::now() < deadline, "session kept open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        console(&running, WATCHER).await.is_err(),
        "login refused too"
    );
    assert_eq!(rows(&ops, "SHOW VERSION").await.len(), 1);
}

/// Acceptance 4 (readiness): 503 with a JSON reason while the guard connection cannot be made,
/// 200 when it can; /healthz answers either way.
#[tokio::test]
async fn readyz_reports_the_guard_connection() {
    let cluster = TestCluster::shared();
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        listener.local_addr().expect("address").port()
    };
    let mut broken = admin_config(&[]);
    broken.guard.dsn = Some(guard_dsn(cluster, closed_port));
    let broken = start(broken, None).await;
    let (status, _, body) = http(broken.http, "GET", "/readyz", None).await;
    assert_eq!(status, 503, "{body}");
    let reason = json(&body);
    assert_eq!(reason["ready"], false);
    assert!(
        reason["reason"]
            .as_str()
            .is_some_and(|r| r.contains("guard")),
        "{reason}"
    );
    assert!(reason["upstream_error"].is_null(), "{reason}");
    let (status, _, _) = http(broken.http, "GET", "/healthz", None).await;
    assert_eq!(status, 200);
    let down = metrics(&broken).await;
    assert_eq!(down.get("lockguard_guard_up"), Some(&0.0), "{down:?}");

    let healthy = start(admin_config(&[]), None).await;
    let (status, _, body) = http(healthy.http, "GET", "/readyz", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["ready"], true);
    assert_eq!(
        metrics(&healthy).await.get("lockguard_guard_up"),
        Some(&1.0)
    );

    // An unreachable upstream is not ready either.
    let mut no_upstream = admin_config(&[]);
    no_upstream.proxy.upstream = lockguard_config::Upstream::Tcp {
        host: "127.0.0.1".into(),
        port: closed_port,
    };
    let no_upstream = start(no_upstream, None).await;
    let (status, _, body) = http(no_upstream.http, "GET", "/readyz", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(json(&body)["upstream_error"].is_string(), "{body}");
}

/// Readiness checks connect to the upstream (a backend fork each on a real server), so they
/// are shared: however many probes arrive, one check at a time and at most one a second.
#[tokio::test]
async fn readyz_connects_upstream_at_most_once_a_second() {
    use lockguard::admin::commands::READINESS_REUSE;
    use std::sync::atomic::{AtomicUsize, Ordering};
    // The readiness check only opens a TCP connection, so a listener that counts them stands
    // in for the upstream here.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = upstream.local_addr().expect("address").port();
    let connects = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&connects);
    tokio::spawn(async move {
        while upstream.accept().await.is_ok() {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    let mut config = admin_config(&[]);
    config.proxy.upstream = lockguard_config::Upstream::Tcp {
        host: "127.0.0.1".into(),
        port,
    };
    let running = start(config, None).await;
    let settled = || async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        connects.load(Ordering::SeqCst)
    };

    let answers =
        futures_util::future::join_all((0..20).map(|_| http(running.http, "GET", "/readyz", None)))
            .await;
    for (status, _, body) in &answers {
        assert_eq!(*status, 200, "{body}");
    }
    assert_eq!(settled().await, 1, "20 concurrent probes, one check");

    tokio::time::sleep(READINESS_REUSE).await;
    let (status, _, body) = http(running.http, "GET", "/readyz", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        settled().await,
        2,
        "a probe after the reuse interval checks again"
    );
}

/// `KILL PID` ends the session whose backend has that pid: outcome `terminated`, its client
/// gets 57P01 naming the operator, the other sessions carry on. SHOW EVENTS lists the kills
/// newest first; SHOW STATS counts them and the sessions' traffic.
#[tokio::test]
async fn kill_pid_ends_one_session_and_events_and_stats_record_it() {
    let db = database("admin_kill_pid").await;
    let running = start(admin_config(&[]), None).await;
    let checker = direct(&db).await;
    let mut first = App::connect(&running, &db).await;
    let mut second = App::connect(&running, &db).await;
    let mut third = App::connect(&running, &db).await;
    for app in [&mut first, &mut second, &mut third] {
        app.exec("SELECT 1").await;
    }
    let ops = console(&running, OPS).await.expect("ops logs in");
    assert_eq!(stats(&ops).await["terminations.operator"], 0);

    let answer = rows(&ops, &format!("KILL PID {}", first.pid)).await;
    assert_eq!(answer.len(), 1, "{answer:?}");
    assert_eq!(answer[0]["outcome"], "terminated", "{answer:?}");
    assert_eq!(answer[0]["backend_pid"], first.pid.to_string());
    let (code, message) = first.farewell().await;
    assert_eq!(code, "57P01");
    assert!(
        message.starts_with("lockguard: terminated by operator")
            && message.contains(&format!("KILL by {}", OPS.0)),
        "{message}"
    );
    assert!(!backend_alive(&checker, first.pid).await, "killed backend");
    for app in [&mut second, &mut third] {
        assert!(
            backend_alive(&checker, app.pid).await,
            "other backends live"
        );
        app.exec("SELECT 2").await;
    }

    let counters = stats(&ops).await;
    assert_eq!(counters["terminations.operator"], 1, "{counters:?}");
    assert_eq!(counters["clients_accepted"], 3, "{counters:?}");
    assert_eq!(counters["sessions_started"], 3, "{counters:?}");
    assert!(counters["bytes_from_clients"] > 0, "{counters:?}");
    assert!(counters["bytes_from_servers"] > 0, "{counters:?}");

    let answer = rows(&ops, &format!("KILL PID {}", second.pid)).await;
    assert_eq!(answer[0]["outcome"], "terminated", "{answer:?}");
    assert_eq!(second.farewell().await.0, "57P01");
    let events = rows(&ops, "SHOW EVENTS").await;
    let pids: Vec<&str> = events.iter().map(|e| e["backend_pid"].as_str()).collect();
    assert_eq!(
        pids,
        [second.pid.to_string(), first.pid.to_string()],
        "newest first: {events:?}"
    );
    assert!(
        events.iter().all(|e| e["trigger"] == "operator"),
        "{events:?}"
    );
    assert_eq!(stats(&ops).await["terminations.operator"], 2);
    third.exec("SELECT 3").await;
}

/// Every command answers with the columns README.md documents, in that order (with rows or
/// without).
#[tokio::test]
async fn every_command_answers_its_documented_columns() {
    let file = tempfile::NamedTempFile::new().expect("temp config file");
    std::fs::write(file.path(), config_text("", "")).expect("write config");
    let running = start_from_file(file.path()).await;
    let ops = console(&running, OPS).await.expect("ops logs in");
    let documented: &[(&str, &[&str])] = &[
        (
            "SHOW CLIENTS",
            &[
                "id",
                "client_addr",
                "client_port",
                "user",
                "database",
                "application_name",
                "backend_pid",
                "state",
                "xact_age_s",
                "state_age_s",
                "protected_locks",
                "waiters",
                "last_statement",
            ],
        ),
        (
            "SHOW LOCKS",
            &["client_id", "backend_pid", "table", "mode", "waiters"],
        ),
        (
            "SHOW EVENTS",
            &[
                "time",
                "client_id",
                "backend_pid",
                "trigger",
                "cause",
                "outcome",
                "locks",
                "waiters",
                "state",
                "idle_ms",
                "xact_ms",
                "user",
                "database",
                "client_addr",
                "application_name",
                "last_statement",
                "error",
                "summary",
            ],
        ),
        ("SHOW STATS", &["name", "value"]),
        ("SHOW CONFIG", &["key", "value", "live"]),
        ("SHOW VERSION", &["version"]),
        (
            "KILL 999999",
            &["client_id", "backend_pid", "outcome", "detail"],
        ),
        (
            "KILL PID 999999",
            &["client_id", "backend_pid", "outcome", "detail"],
        ),
        ("RELOAD", &["key", "old_value", "new_value", "status"]),
        ("SET dry_run = off", &["name", "value", "previous"]),
    ];
    for (command, expected) in documented {
        assert_eq!(column_names(&ops, command).await, *expected, "{command}");
    }
}

/// `/metrics` carries the probe latency histogram, bytes each way and upstream connect
/// errors; the last counts a client the proxy could not connect upstream for.
#[tokio::test]
async fn metrics_show_probe_latency_bytes_and_upstream_connect_errors() {
    let db = database("admin_metrics").await;
    let running = start(admin_config(&[]), None).await;
    let mut app = App::connect(&running, &db).await;
    app.exec("SELECT repeat('x', 1000)").await;
    let ops = console(&running, OPS).await.expect("ops logs in");
    // SHOW CLIENTS probes the session's database.
    rows(&ops, "SHOW CLIENTS").await;
    let m = metrics(&running).await;
    let probes = m["lockguard_probe_duration_seconds_count"];
    assert!(probes >= 1.0, "{m:?}");
    assert_eq!(
        m.get("lockguard_probe_duration_seconds_bucket{le=\"+Inf\"}"),
        Some(&probes)
    );
    let finite_buckets = m
        .keys()
        .filter(|k| k.starts_with("lockguard_probe_duration_seconds_bucket{") && !k.contains("Inf"))
        .count();
    assert!(finite_buckets > 1, "{m:?}");
    assert!(m["lockguard_bytes_total{direction=\"client_to_server\"}"] > 0.0);
    assert!(m["lockguard_bytes_total{direction=\"server_to_client\"}"] > 1000.0);
    assert_eq!(m.get("lockguard_upstream_connect_errors_total"), Some(&0.0));

    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        listener.local_addr().expect("address").port()
    };
    let mut config = admin_config(&[]);
    config.proxy.upstream = lockguard_config::Upstream::Tcp {
        host: "127.0.0.1".into(),
        port: closed_port,
    };
    let unreachable = start(config, None).await;
    let errors = "lockguard_upstream_connect_errors_total";
    assert_eq!(metrics(&unreachable).await.get(errors), Some(&0.0));
    let e = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(unreachable.addr.port())
        .user(TestCluster::shared().superuser())
        .dbname(&db)
        .connect_timeout(WAIT)
        .connect(NoTls)
        .await
        .err()
        .expect("no upstream to connect to");
    assert_eq!(code_of(&e), Some(&SqlState::CONNECTION_FAILURE), "{e:?}");
    assert_eq!(metrics(&unreachable).await.get(errors), Some(&1.0));
    let ops = console(&unreachable, OPS).await.expect("ops logs in");
    assert_eq!(stats(&ops).await["upstream_connect_errors"], 1);
}

/// Accepts connections on `listener` and copies bytes both ways to `target`.
fn forward(listener: tokio::net::TcpListener, target: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })
}

/// Acceptance 4 on one instance: `/readyz` is 503 naming the guard while nothing listens on
/// the guard's port, and turns 200 once that port leads to the database.
#[tokio::test]
async fn readyz_turns_ready_when_the_guard_port_comes_up() {
    use lockguard::admin::commands::READINESS_REUSE;
    let cluster = TestCluster::shared();
    let guard_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        listener.local_addr().expect("address").port()
    };
    let mut config = admin_config(&[]);
    config.guard.dsn = Some(format!(
        "host=127.0.0.1 port={guard_port} user={} dbname=postgres",
        guard_support::guard_role(cluster)
    ));
    let running = start(config, None).await;
    let (status, _, body) = http(running.http, "GET", "/readyz", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        json(&body)["reason"]
            .as_str()
            .is_some_and(|r| r.contains("guard")),
        "{body}"
    );

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", guard_port))
        .await
        .expect("listen on the guard's port");
    let forwarder = forward(listener, format!("{}:{}", cluster.host(), cluster.port()));
    tokio::time::sleep(READINESS_REUSE).await;
    // The guard may be waiting out a reconnect backoff: poll, with a generous bound.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, _, body) = http(running.http, "GET", "/readyz", None).await;
        if status == 200 {
            assert_eq!(json(&body)["ready"], true, "{body}");
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "still not ready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    forwarder.abort();
}

/// Acceptance 5: the real psql runs SHOW CLIENTS against the console.
#[tokio::test]
async fn psql_runs_show_clients() {
    let db = database("admin_psql").await;
    let running = start(admin_config(&[]), None).await;
    let app = App::connect(&running, &db).await;
    let conninfo = format!(
        "host=127.0.0.1 port={} user={} password={} dbname=lockguard",
        running.console.port(),
        OPS.0,
        OPS.1
    );
    let Some(out) = psql::run(&[conninfo.as_str(), "-A", "-c", "SHOW CLIENTS"]).await else {
        return;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "psql failed: {stderr}");
    let mut lines = stdout.lines();
    assert_eq!(
        lines.next(),
        Some(
            "id|client_addr|client_port|user|database|application_name|backend_pid|state|\
             xact_age_s|state_age_s|protected_locks|waiters|last_statement"
        ),
        "{stdout}"
    );
    let row = lines.next().expect("one client row");
    let fields: Vec<&str> = row.split('|').collect();
    assert_eq!(fields[4], db, "{row}");
    assert_eq!(fields[6], app.pid.to_string(), "{row}");
    assert_eq!(fields[7], "idle", "{row}");
    assert_eq!(lines.next(), Some("(1 row)"), "{stdout}");
}

#[test]
fn the_prometheus_parser_rejects_malformed_text() {
    let good = "# HELP a_total things\n# TYPE a_total counter\na_total{x=\"1\\\"\"} 3\n";
    assert_eq!(
        parse_prometheus(good).get("a_total{x=\"1\\\"\"}"),
        Some(&3.0)
    );
    for bad in [
        "a 1\n",                                                          // no TYPE
        "# TYPE a gauge\na 1",                                            // no final newline
        "# TYPE a gauge\na{x=1} 1\n",                                     // unquoted label
        "# TYPE a gauge\na one\n",                                        // not a number
        "# TYPE a gauge\na 1\na 2\n",                                     // duplicate series
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_count 2\nh_sum 1\n", // no +Inf
    ] {
        let result = std::panic::catch_unwind(|| parse_prometheus(bad));
        assert!(result.is_err(), "accepted {bad:?}");
    }
}

async fn presented_certificate(addr: SocketAddr, ca: &std::path::Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).expect("read CA") {
        roots.add(cert.expect("parse CA")).expect("add CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(
        raw::encryption_request(&mut tcp, raw::SSL_REQUEST).await,
        b'S',
        "TLS offered"
    );
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("server name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let (_, session) = tls.get_ref();
    session.peer_certificates().expect("a certificate")[0].to_vec()
}

/// Issue 7 through the admin port: RELOAD re-reads certificate files replaced in place; new
/// connections get the new certificate, a session from before carries on; an unreadable key
/// is refused and the old certificate stays.
#[tokio::test]
async fn reload_re_reads_tls_certificates() {
    let db = database("admin_tls").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = lockguard_tests::certs::TestCa::new("admin reload CA");
    let ca_file = ca.write_ca(dir.path(), "ca.crt");
    let first = ca.issue(dir.path(), "first", &["127.0.0.1"]);
    let second = ca.issue(dir.path(), "second", &["127.0.0.1"]);
    let (live_cert, live_key) = (dir.path().join("live.crt"), dir.path().join("live.key"));
    let install = |files: &lockguard_tests::certs::CertFiles| {
        std::fs::copy(&files.cert, &live_cert).expect("copy certificate");
        std::fs::copy(&files.key, &live_key).expect("copy key");
    };
    install(&first);
    let file = tempfile::NamedTempFile::new().expect("temp config file");
    let tls = format!(
        "[tls]\nclient_cert = \"{}\"\nclient_key = \"{}\"\n",
        live_cert.display(),
        live_key.display()
    );
    std::fs::write(file.path(), config_text("", &tls)).expect("write config");
    let running = start_from_file(file.path()).await;
    let ops = console(&running, OPS).await.expect("ops logs in");
    let mut before = App::connect(&running, &db).await;
    assert_eq!(
        presented_certificate(running.addr, &ca_file).await,
        first.der
    );

    install(&second);
    rows(&ops, "RELOAD").await;
    assert_eq!(
        presented_certificate(running.addr, &ca_file).await,
        second.der
    );
    before.exec("SELECT 1").await;

    std::fs::write(&live_key, "not a key").expect("break the key");
    let e = ops.simple_query("RELOAD").await.expect_err("broken key");
    assert_eq!(code_of(&e), Some(&SqlState::CONFIG_FILE_ERROR), "{e:?}");
    assert_eq!(
        presented_certificate(running.addr, &ca_file).await,
        second.der
    );
    before.exec("SELECT 2").await;
}

/// A flood of anonymous readers (no API token) shares the guard's probes: as many concurrent
/// `GET /api/clients` as the endpoint serves at once all answer with the session's probed
/// facts, yet cost at most one probe per 250 ms of the flood (plus the first), not one each.
#[tokio::test]
async fn a_flood_of_api_readers_shares_a_few_probes() {
    const READERS: usize = lockguard::admin::http::MAX_HTTP_CONNECTIONS;
    lockguard_tests::resources::raise_open_files_limit(4096).expect("open-files limit");
    let db = database("admin_flood").await;
    let mut config = admin_config(&[]);
    config.admin.api_token = None;
    let running = start(config, None).await;
    let app = App::connect(&running, &db).await;
    let guard = running.admin.guard().expect("guard enabled");
    let probes_before = guard.probe_latency().count;
    let started = std::time::Instant::now();
    let answers = futures_util::future::join_all(
        (0..READERS).map(|_| http(running.http, "GET", "/api/clients", None)),
    )
    .await;
    let elapsed = started.elapsed();
    let probes = guard.probe_latency().count - probes_before;
    for (status, _, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        let clients = json(body);
        let row = clients
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["backend_pid"] == app.pid))
            .unwrap_or_else(|| panic!("the session is listed: {body}"));
        // Probed (a number), not left NULL: every reader got a probe's answer.
        assert_eq!(row["protected_locks"], 0, "{row}");
    }
    let allowed = 2 + elapsed.as_millis() as u64 / 250;
    assert!(
        (1..=allowed).contains(&probes),
        "{READERS} readers in {elapsed:?} ran {probes} probes (at most {allowed} allowed)"
    );
}

// ---- an unauthenticated console costs little ------------------------------------------

/// Protocol 3.0's StartupMessage code.
const PROTOCOL_3_0: u32 = raw::PROTOCOL_3_0;

/// Sends `ops`'s StartupMessage for the console database.
async fn send_ops_startup(stream: &mut TcpStream) {
    let startup = raw::startup_packet(PROTOCOL_3_0, &[("user", OPS.0), ("database", "lockguard")]);
    stream.write_all(&startup).await.expect("send the startup");
}

/// Starts `ops`'s login and returns the console's authentication request.
async fn begin_ops_login(stream: &mut TcpStream) -> Received {
    send_ops_startup(stream).await;
    let challenge = raw::read_message(stream, WAIT)
        .await
        .expect("an authentication request");
    assert_eq!(challenge.tag, b'R', "{challenge:?}");
    challenge
}

/// Bytes each flooding connection tries to send after its `Q` header.
const FLOOD_BYTES: usize = 32 << 20;

/// One flooding connection: a login as `ops` (never completed), then a `Q` header declaring
/// 500 MB and its body trickled in 64 KiB chunks. Returns how much of the body got out
/// before the console cut the connection, `None` if it never did.
async fn flood_with_a_huge_query(console: SocketAddr) -> Option<usize> {
    let mut stream = TcpStream::connect(console)
        .await
        .expect("connect to the console");
    send_ops_startup(&mut stream).await;
    let mut header = vec![b'Q'];
    header.extend_from_slice(&500_000_004u32.to_be_bytes());
    if stream.write_all(&header).await.is_err() {
        return Some(0);
    }
    let chunk = vec![b'x'; 64 << 10];
    let mut sent = 0;
    while sent < FLOOD_BYTES {
        if stream.write_all(&chunk).await.is_err() {
            return Some(sent);
        }
        sent += chunk.len();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    None
}

/// Issue 4 follow-up: 20 unauthenticated console connections that each declare a 500 MB
/// query and keep sending it (640 MiB offered in all) are cut at the header, the process
/// grows by far less than what they sent, and a console user and a proxied session carry on.
#[tokio::test]
async fn huge_unauthenticated_messages_are_cut_with_bounded_memory() {
    const FLOODERS: usize = 20;
    let db = database("admin_flood_console").await;
    let running = start(admin_config(&[]), None).await;
    let mut app = App::connect(&running, &db).await;
    let ops = console(&running, OPS).await.expect("ops logs in");
    let rss_before = lockguard_tests::resources::vm_rss_bytes().expect("VmRSS");

    let flooding = std::sync::atomic::AtomicBool::new(true);
    let flood = async {
        let flooders = (0..FLOODERS).map(|_| flood_with_a_huge_query(running.console));
        let cut = futures_util::future::join_all(flooders).await;
        flooding.store(false, std::sync::atomic::Ordering::Relaxed);
        cut
    };
    // The peak counts: buffers are freed once the flooders hang up.
    let sample_peak_rss = async {
        let mut peak = rss_before;
        while flooding.load(std::sync::atomic::Ordering::Relaxed) {
            peak = peak.max(lockguard_tests::resources::vm_rss_bytes().expect("VmRSS"));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        peak
    };
    let (cut, rss_peak, _) = tokio::join!(flood, sample_peak_rss, async {
        // Meanwhile the console and the proxy keep answering.
        let clients = rows(&ops, "SHOW CLIENTS").await;
        assert!(
            clients
                .iter()
                .any(|c| c["backend_pid"] == app.pid.to_string()),
            "{clients:?}"
        );
        app.exec("SELECT 1").await;
    });

    let grown = rss_peak.saturating_sub(rss_before);
    assert!(
        grown < 64 << 20,
        "RSS grew by {} MiB while {FLOODERS} connections offered {} MiB",
        grown >> 20,
        (FLOODERS * FLOOD_BYTES) >> 20
    );
    for (i, sent) in cut.iter().enumerate() {
        let sent = sent.unwrap_or_else(|| {
            panic!("flooder {i} sent all {FLOOD_BYTES} bytes without being cut")
        });
        assert!(sent < FLOOD_BYTES, "flooder {i}");
    }
    // Everything still works, new console logins included.
    app.exec("SELECT 2").await;
    assert_eq!(rows(&ops, "SHOW VERSION").await.len(), 1);
    let watcher = console(&running, WATCHER).await.expect("watcher logs in");
    assert!(!rows(&watcher, "SHOW CLIENTS").await.is_empty());
}

/// The console serves at most `MAX_CONSOLE_CONNECTIONS` connections; the next one is refused
/// with 53300 and a slot is free again once one of them closes.
#[tokio::test]
async fn the_console_refuses_connections_over_its_cap() {
    use lockguard::admin::console::MAX_CONSOLE_CONNECTIONS;
    let running = start(admin_config(&[]), None).await;
    let mut held = Vec::new();
    for _ in 0..MAX_CONSOLE_CONNECTIONS {
        held.push(
            TcpStream::connect(running.console)
                .await
                .expect("connect to the console"),
        );
    }
    // Connections are accepted in order: the held ones fill every slot first.
    let e = console(&running, OPS).await.expect_err("over the cap");
    assert_eq!(code_of(&e), Some(&SqlState::TOO_MANY_CONNECTIONS), "{e:?}");

    held.pop();
    let deadline = tokio::time::Instant::now() + WAIT;
    let ops = loop {
        match console(&running, OPS).await {
            Ok(ops) => break ops,
            Err(e) if tokio::time::Instant::now() < deadline => {
                assert_eq!(code_of(&e), Some(&SqlState::TOO_MANY_CONNECTIONS), "{e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no slot freed after a connection closed: {e:?}"),
        }
    };
    assert_eq!(rows(&ops, "SHOW VERSION").await.len(), 1);
}

/// The HTTP endpoint serves at most `MAX_HTTP_CONNECTIONS` connections; the next gets a 503
/// that says why. A connection that sends no request head within `proxy.startup_timeout` is
/// closed, which frees its slot; one that sent its request half-way is closed too.
#[tokio::test]
async fn the_http_endpoint_caps_connections_and_closes_silent_ones() {
    use lockguard::admin::http::MAX_HTTP_CONNECTIONS;
    let mut config = admin_config(&[]);
    config.proxy.startup_timeout = Duration::from_secs(1);
    let running = start(config, None).await;
    let mut held = Vec::new();
    for _ in 0..MAX_HTTP_CONNECTIONS {
        held.push(TcpStream::connect(running.http).await.expect("connect"));
    }
    held[0]
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: lock")
        .await
        .expect("half a request");
    let (status, headers, body) = http(running.http, "GET", "/healthz", None).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(headers.get("retry-after").map(String::as_str), Some("1"));
    assert!(
        json(&body)["error"]
            .as_str()
            .is_some_and(|e| e.contains("too many admin HTTP connections")),
        "{body}"
    );

    for (i, silent) in held.iter_mut().enumerate() {
        assert!(
            raw::closed_within(silent, WAIT).await,
            "connection {i} kept open without a request"
        );
    }
    let (status, _, body) = http(running.http, "GET", "/healthz", None).await;
    assert_eq!(status, 200, "{body}");
}

/// A console connection gets `proxy.startup_timeout` to log in, silent or half-way through
/// the password exchange; one that logged in stays.
#[tokio::test]
async fn console_logins_are_bounded_by_startup_timeout() {
    let mut config = admin_config(&[]);
    config.proxy.startup_timeout = Duration::from_secs(1);
    let running = start(config, None).await;
    let mut silent = TcpStream::connect(running.console).await.expect("connect");
    let mut halfway = TcpStream::connect(running.console).await.expect("connect");
    begin_ops_login(&mut halfway).await;
    let ops = console(&running, OPS).await.expect("ops logs in");
    assert!(
        raw::closed_within(&mut silent, WAIT).await,
        "silent connection kept"
    );
    assert!(
        raw::closed_within(&mut halfway, WAIT).await,
        "half-way login kept"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(rows(&ops, "SHOW VERSION").await.len(), 1);
}

/// psql opens with an SSLRequest (and a GSSENCRequest where it has Kerberos): a console
/// without a certificate (neither its own nor the client side's) declines both with 'N' and
/// the login goes on.
#[tokio::test]
async fn the_console_declines_encryption_requests() {
    let running = start(admin_config(&[]), None).await;
    let mut stream = TcpStream::connect(running.console).await.expect("connect");
    for code in [raw::SSL_REQUEST, raw::GSSENC_REQUEST] {
        let answer = raw::encryption_request(&mut stream, code).await;
        assert_eq!(answer, b'N', "request {code}");
    }
    let challenge = begin_ops_login(&mut stream).await;
    // AuthenticationSASL (10) offering SCRAM-SHA-256.
    assert_eq!(challenge.body[..4], 10u32.to_be_bytes());
    assert!(challenge.body.windows(13).any(|w| w == b"SCRAM-SHA-256"));
}
