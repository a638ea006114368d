//! The operator's web page (`/ui`) in a real browser: headless Chromium driven over WebDriver
//! (chromedriver, started here on a free port) against lockguard in front of the test cluster.
//! An incident is staged — a proxied session holds a row of the protected table in an open
//! transaction, a direct session waits for it — and the page must draw the wait, kill the
//! holder with the token the operator types, and show the event; without a token it is
//! read-only. The page's HTTP answers (security headers, the Host check) are checked too.
//!
//! Chromium and chromedriver are not optional: without them the test fails and says which
//! Debian packages to install (`.ci/run` installs them).

use std::time::{Duration, Instant};

use fantoccini::Locator;
use lockguard_tests::admin::{admin_config, database, direct, start, Running, API_TOKEN};
use lockguard_tests::cluster::TestCluster;
use lockguard_tests::guard_support::{app_role, backend_alive, wait_for, BlockedLogin};
use lockguard_tests::http::Request;
use tokio_postgres::NoTls;

/// The page must show a new wait within this long (it refreshes every 1.5 s).
const SHOWN_WITHIN: Duration = Duration::from_secs(3);
/// How long the other page updates and the kill may take.
const WAIT: Duration = Duration::from_secs(10);

#[path = "web_ui/browser.rs"]
mod browser;
use browser::{open_page, page_text, save_screenshot, shown, use_token};

// ---- the incident -------------------------------------------------------------------------

/// An application name that is markup: the page must show it, never parse it.
const HOSTILE_APPLICATION: &str = "<b id=\"injected\">report-job</b>";

/// A proxied application session, through tokio-postgres so it names its application.
async fn proxied(running: &Running, db: &str, application: &str) -> (tokio_postgres::Client, i32) {
    let (client, connection) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(running.addr.port())
        .user(app_role(TestCluster::shared()))
        .dbname(db)
        .application_name(application)
        .connect_timeout(WAIT)
        .connect(NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting through the proxy: {e:?}"));
    tokio::spawn(connection);
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("the backend pid")
        .get(0);
    (client, pid)
}

/// A proxied session that holds row 1 of `app.user_sessions` in an open transaction, and its
/// client id; a bystander session that holds nothing.
async fn blocker(running: &Running, db: &str) -> (tokio_postgres::Client, i32, u64) {
    let (client, pid) = proxied(running, db, "billing-worker").await;
    client
        .batch_execute("BEGIN; UPDATE app.user_sessions SET token = 'held' WHERE id = 1")
        .await
        .expect("the holder's update");
    let id = running
        .admin
        .registry()
        .find_by_pid(pid)
        .expect("the holder is a registered session")
        .id;
    (client, pid, id)
}

/// The token-protected endpoint: the operator types the token, the page draws the wait (the
/// holder marked with the idle rule's countdown), the kill button ends the holder, the waiter
/// proceeds and the event appears; a screenshot of the incident goes to
/// `target/web-ui/incident.png`. One test on purpose, longer than most: each step acts on the
/// page the previous one left (the token typed, the wait drawn, the kill, its event).
#[tokio::test]
async fn the_page_draws_a_wait_and_its_kill_button_frees_the_waiter() {
    let cluster = TestCluster::shared();
    let db = database("webui_kill").await;
    let mut config = admin_config(&["app.user_sessions"]);
    // Long enough that only the operator acts; the page shows the countdown.
    config.guard.idle_in_transaction_timeout = Duration::from_secs(600);
    let running = start(config, None).await;
    let observer = direct(&db).await;
    let (_holder, holder_pid, holder_id) = blocker(&running, &db).await;
    let (bystander, _) = proxied(&running, &db, "report-job").await;
    bystander.execute("SELECT 1", &[]).await.expect("a query");

    let (_driver, browser) = open_page(&format!("http://{}/ui", running.http)).await;
    // No token yet: read-only, and this endpoint does not even answer reads.
    let mode = shown(&browser, "#mode.read-only", WAIT).await;
    assert!(mode.text().await.expect("text").contains("read-only"));
    shown(&browser, "#status.error", WAIT).await;
    assert!(page_text(&browser, "#status").await.contains("token"));

    use_token(&browser, API_TOKEN).await;
    shown(&browser, "#mode.armed", WAIT).await;
    let holder_node = format!("#graph g.node[data-node=\"client:{holder_id}\"]");
    shown(&browser, &holder_node, WAIT).await;

    let login = BlockedLogin::start(cluster, &db, &observer).await;
    let waiting_since = Instant::now();
    let edge = format!(
        "#graph g.edge[data-waiter=\"pid:{}\"][data-holder=\"client:{holder_id}\"]",
        login.pid
    );
    shown(&browser, &edge, SHOWN_WITHIN).await;
    assert!(waiting_since.elapsed() <= SHOWN_WITHIN + Duration::from_millis(500));
    let label = page_text(&browser, &edge).await;
    assert!(label.contains("app.user_sessions"), "{label}");
    assert!(label.contains("RowExclusiveLock"), "{label}");
    // The holder: its application, backend, state, and the idle rule counting down on it.
    let holder_text = shown(&browser, &format!("{holder_node}.holder.due"), WAIT)
        .await
        .text()
        .await
        .expect("the holder's text");
    for part in [
        "billing-worker",
        &format!("pid {holder_pid}"),
        "idle in transaction",
        "terminate in",
        "rule default",
    ] {
        assert!(holder_text.contains(part), "{part:?} in {holder_text:?}");
    }
    // The waiter is not lockguard's: drawn as an outside node, with how long it has waited
    // (once the server reports when the wait began: pg_locks.waitstart can lag the wait,
    // and a redraw without it shows no duration yet).
    let outside_node = format!("#graph g.node.outside[data-node=\"pid:{}\"]", login.pid);
    wait_for(WAIT, "the outside waiter drawn with its wait", || {
        let browser = browser.clone();
        let css = outside_node.clone();
        async move { page_text(&browser, &css).await.contains("waiting") }
    })
    .await;
    let outside = page_text(&browser, &outside_node).await;
    assert!(outside.contains("not proxied"), "{outside}");
    // The clients table lists both sessions; the holder's row is marked.
    shown(
        &browser,
        &format!("#clients-body tr.holder[data-client=\"{holder_id}\"]"),
        WAIT,
    )
    .await;
    save_screenshot(&browser, "incident.png").await;

    // Kill asks once more; the second click ends the holder's backend.
    let kill = format!("#clients-body button.kill[data-client=\"{holder_id}\"]");
    let button = shown(&browser, &kill, WAIT).await;
    assert!(button.is_enabled().await.expect("enabled?"));
    button.click().await.expect("click Kill");
    shown(&browser, &format!("{kill}.confirm"), WAIT)
        .await
        .click()
        .await
        .expect("click Confirm kill");
    login.proceeds(WAIT).await;
    assert!(!backend_alive(&observer, holder_pid).await);
    let event = shown(
        &browser,
        &format!(
            "#events li[data-client=\"{holder_id}\"][data-trigger=\"operator\"][data-outcome=\"terminated\"]"
        ),
        WAIT,
    )
    .await
    .text()
    .await
    .expect("the event's text");
    assert!(event.contains(&holder_pid.to_string()), "{event}");
    assert!(event.contains("app.user_sessions"), "{event}");
    // The graph lets go of the wait and of the holder.
    wait_for(WAIT, "the wait to leave the graph", || {
        let browser = browser.clone();
        let edge = edge.clone();
        async move { browser.find(Locator::Css(&edge)).await.is_err() }
    })
    .await;
    save_screenshot(&browser, "after-kill.png").await;

    // The token lived in the script's memory only: no storage, no cookie, and a reload
    // forgets it.
    let stored = browser
        .execute(
            "return [localStorage.length, sessionStorage.length, document.cookie];",
            vec![],
        )
        .await
        .expect("read the page's storage");
    assert_eq!(stored, serde_json::json!([0, 0, ""]));
    browser.refresh().await.expect("reload the page");
    shown(&browser, "#mode.read-only", WAIT).await;
    browser.close().await.expect("close the browser");
}

/// Without an API token configured the page shows the incident to anyone on a loopback or
/// IP address, but is read-only: it says so and every kill button is disabled.
#[tokio::test]
async fn without_a_token_the_page_is_read_only_and_its_kill_buttons_are_disabled() {
    let cluster = TestCluster::shared();
    let db = database("webui_read_only").await;
    let mut config = admin_config(&["app.user_sessions"]);
    config.admin.api_token = None;
    let running = start(config, None).await;
    let observer = direct(&db).await;
    let (_holder, holder_pid, holder_id) = blocker(&running, &db).await;

    let (_driver, browser) = open_page(&format!("http://{}/ui", running.http)).await;
    let login = BlockedLogin::start(cluster, &db, &observer).await;
    shown(
        &browser,
        &format!(
            "#graph g.edge[data-waiter=\"pid:{}\"][data-holder=\"client:{holder_id}\"]",
            login.pid
        ),
        SHOWN_WITHIN,
    )
    .await;
    let button = shown(
        &browser,
        &format!("#clients-body button.kill[data-client=\"{holder_id}\"]"),
        WAIT,
    )
    .await;
    assert!(!button.is_enabled().await.expect("enabled?"));
    assert!(page_text(&browser, "#mode").await.contains("read-only"));
    // Clicking a disabled button does nothing: the holder is still there.
    let _ = button.click().await;
    assert!(backend_alive(&observer, holder_pid).await);
    browser.close().await.expect("close the browser");
}

/// The clients table lists the longest in its state first, flips the order on a click and
/// filters by application; a client's application name that is markup (any client may send
/// one) is shown as text, in the table and the graph, never parsed.
#[tokio::test]
async fn the_clients_table_sorts_and_filters_and_shows_client_names_as_text() {
    let db = database("webui_table").await;
    let mut config = admin_config(&["app.user_sessions"]);
    config.admin.api_token = None;
    let running = start(config, None).await;
    let (_holder, _, holder_id) = blocker(&running, &db).await;
    let (bystander, _) = proxied(&running, &db, HOSTILE_APPLICATION).await;
    bystander.execute("SELECT 1", &[]).await.expect("a query");
    let (_driver, browser) = open_page(&format!("http://{}/ui", running.http)).await;
    let order = || async {
        let rows = browser
            .find_all(Locator::Css("#clients-body tr"))
            .await
            .expect("the rows");
        let mut ids = Vec::new();
        for row in rows {
            ids.push(
                row.attr("data-client")
                    .await
                    .expect("attr")
                    .unwrap_or_default(),
            );
        }
        ids
    };
    shown(&browser, "#clients-body tr:nth-child(2)", WAIT).await;
    let first = order().await;
    assert_eq!(first[0], holder_id.to_string(), "{first:?}");
    browser
        .find(Locator::Css("th button.sort[data-key=\"state_age_s\"]"))
        .await
        .expect("the in-state header")
        .click()
        .await
        .expect("sort");
    let flipped = order().await;
    assert_eq!(flipped.last(), Some(&holder_id.to_string()), "{flipped:?}");
    browser
        .find(Locator::Id("filter-application"))
        .await
        .expect("the application filter")
        .send_keys("report")
        .await
        .expect("type a filter");
    let filtered = order().await;
    assert_eq!(filtered.len(), 1, "{filtered:?}");
    assert_ne!(filtered[0], holder_id.to_string(), "{filtered:?}");
    let table = page_text(&browser, "#clients-body").await;
    assert!(table.contains(HOSTILE_APPLICATION), "{table}");
    let graph = page_text(&browser, "#graph").await;
    assert!(graph.contains("<b id=\"injected\">"), "{graph}");
    assert!(
        browser.find(Locator::Id("injected")).await.is_err(),
        "a client's application name became markup"
    );
    browser.close().await.expect("close the browser");
}

// ---- the page's HTTP answers --------------------------------------------------------------

const SECURITY_HEADERS: [(&str, &str); 2] = [
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
];

fn assert_security_headers(what: &str, response: &lockguard_tests::http::Response) {
    for (name, value) in SECURITY_HEADERS {
        assert_eq!(
            response.headers.get(name).map(String::as_str),
            Some(value),
            "{name} on {what}: {:?}",
            response.headers
        );
    }
    let csp = response
        .headers
        .get("content-security-policy")
        .unwrap_or_else(|| panic!("no Content-Security-Policy on {what}"));
    for directive in [
        "default-src 'self'",
        "script-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} in {csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
}

/// The page, its assets, the API and the refusals all carry the CSP (own script and style
/// only), X-Frame-Options DENY and nosniff; the page needs no inline code to work under it.
#[tokio::test]
async fn every_answer_carries_the_security_headers_and_the_page_has_no_inline_code() {
    let running = start(admin_config(&["app.user_sessions"]), None).await;
    for (path, token, status, content_type) in [
        ("/ui", None, 200, "text/html"),
        ("/ui/app.js", None, 200, "text/javascript"),
        ("/ui/style.css", None, 200, "text/css"),
        ("/api/locks", Some(API_TOKEN), 200, "application/json"),
        ("/api/locks", None, 401, "application/json"),
        ("/api/clients", Some("wrong"), 403, "application/json"),
        ("/healthz", None, 200, "application/json"),
    ] {
        let response = Request::get(path).token(token).send(running.http).await;
        assert_eq!(response.status, status, "{path}: {}", response.body);
        assert!(
            response
                .headers
                .get("content-type")
                .is_some_and(|t| t.starts_with(content_type)),
            "{path}: {:?}",
            response.headers
        );
        assert_security_headers(path, &response);
    }
    let root = Request::get("/").send(running.http).await;
    assert!((300..400).contains(&root.status), "{}", root.status);
    assert_eq!(
        root.headers.get("location").map(String::as_str),
        Some("/ui")
    );
    assert_security_headers("/", &root);

    let page = Request::get("/ui").send(running.http).await.body;
    let lower = page.to_ascii_lowercase();
    assert!(!lower.contains("<style"), "inline style element");
    assert!(!lower.contains(" style="), "inline style attribute");
    assert!(!lower.contains("javascript:"), "javascript: URL");
    // Every script is an external file of the endpoint's own.
    assert_eq!(
        lower.matches("<script").count(),
        lower.matches("<script src=\"/ui/").count(),
        "inline script"
    );
    // No inline event handler attribute (onclick=, onload=, ...).
    let handler = lower
        .split(|c: char| c.is_whitespace())
        .find(|word| word.starts_with("on") && word.contains('='));
    assert_eq!(handler, None, "inline event handler");
    // No external resource: every src/href is the endpoint's own.
    for attribute in ["src=\"", "href=\""] {
        for value in lower.split(attribute).skip(1) {
            assert!(value.starts_with('/'), "{attribute}{value:.40}");
        }
    }

    let locks = Request::get("/api/locks")
        .token(Some(API_TOKEN))
        .send(running.http)
        .await
        .json();
    assert!(
        locks["nodes"].is_array() && locks["edges"].is_array(),
        "{locks}"
    );
    assert_eq!(locks["guard_enabled"], true, "{locks}");
}

/// Without a token the page and the lock graph are under the Host check like the rest of the
/// API: a DNS-rebinding page (a name that is not an IP literal or localhost) gets 421, with
/// the security headers; by IP or as localhost they answer.
#[tokio::test]
async fn without_a_token_the_page_answers_only_requests_addressed_by_ip_or_localhost() {
    let mut config = admin_config(&["app.user_sessions"]);
    config.admin.api_token = None;
    let running = start(config, None).await;
    for path in ["/", "/ui", "/ui/app.js", "/ui/style.css", "/api/locks"] {
        for host in [
            "attacker.example",
            "attacker.example:9930",
            "localhost.attacker.example",
        ] {
            let response = Request::get(path).host(host).send(running.http).await;
            assert_eq!(response.status, 421, "{path} for {host}: {}", response.body);
            assert_security_headers(path, &response);
        }
        let localhost = format!("localhost:{}", running.http.port());
        for host in [running.http.to_string(), localhost] {
            let response = Request::get(path).host(&host).send(running.http).await;
            assert!(
                response.status == 200 || (path == "/" && response.status < 400),
                "{path} for {host}: {} {}",
                response.status,
                response.body
            );
        }
    }
}

// ---- the lock graph behind the page -------------------------------------------------------

/// `GET /api/locks` for a chain: proxied A holds the row, proxied B's UPDATE waits for A, a
/// direct session C queues behind them. B → A is an edge between two clients labelled with
/// the table and A's mode; C is an outside node (its user and how long it has waited) with an
/// edge into the chain; A, idle in its transaction, carries its table's rule's idle countdown, B
/// (busy) none.
#[tokio::test]
async fn the_lock_graph_shows_a_chain_its_outside_waiter_and_the_holders_due_action() {
    let cluster = TestCluster::shared();
    let db = database("webui_chain").await;
    let mut config = admin_config(&["app.user_sessions"]);
    config.guard.idle_in_transaction_timeout = Duration::from_secs(600);
    // The login table has its own rule with a shorter idle timeout: the countdown is its.
    config.guard.rules = vec![serde_json::from_value(serde_json::json!({
        "name": "login",
        "tables": ["app.user_sessions"],
        "idle_in_transaction_timeout": "300s",
    }))
    .expect("a rule")];
    let running = start(config, None).await;
    let observer = direct(&db).await;
    let (_a, _, a_id) = blocker(&running, &db).await;
    let (b, b_pid) = proxied(&running, &db, "second-writer").await;
    let b_id = running
        .admin
        .registry()
        .find_by_pid(b_pid)
        .expect("B is a registered session")
        .id;
    let b_update = tokio::spawn(async move {
        b.execute("UPDATE app.user_sessions SET token = 'b' WHERE id = 1", &[])
            .await
    });
    lockguard_tests::guard_support::wait_until_waiting(&observer, b_pid).await;
    let c = BlockedLogin::start(cluster, &db, &observer).await;

    let view = Request::get("/api/locks")
        .token(Some(API_TOKEN))
        .send(running.http)
        .await
        .json();
    let edges = view["edges"].as_array().expect("edges");
    let (a, b, c_node) = (
        format!("client:{a_id}"),
        format!("client:{b_id}"),
        format!("pid:{}", c.pid),
    );
    let edge = |waiter: &str, holder: &str| {
        edges
            .iter()
            .find(|e| e["waiter"] == waiter && e["holder"] == holder)
            .cloned()
    };
    let b_to_a = edge(&b, &a).unwrap_or_else(|| panic!("no edge {b} -> {a}: {view}"));
    assert_eq!(b_to_a["table"], "app.user_sessions", "{view}");
    assert_eq!(b_to_a["mode"], "RowExclusiveLock", "{view}");
    assert!(
        edge(&c_node, &a).is_some() || edge(&c_node, &b).is_some(),
        "no edge from {c_node} into the chain: {view}"
    );
    let node = |id: &str| {
        view["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .find(|n| n["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no node {id}: {view}"))
    };
    let outside = node(&c_node);
    assert_eq!(outside["kind"], "outside", "{outside}");
    assert_eq!(outside["user"], cluster.superuser(), "{outside}");
    assert!(outside["waited_s"].as_f64().is_some(), "{outside}");
    let holder = node(&a);
    assert_eq!(holder["due"]["rule"], "login", "{holder}");
    assert_eq!(holder["due"]["action"], "terminate", "{holder}");
    assert_eq!(holder["due"]["trigger"], "idle_in_transaction", "{holder}");
    let left = holder["due"]["in_s"].as_f64().expect("time left");
    assert!(left > 200.0 && left <= 300.0, "{holder}");
    let busy = node(&b);
    assert!(busy["due"].is_null(), "{busy}");
    assert_eq!(busy["state"], "active", "{busy}");
    assert!(busy["waited_s"].as_f64().is_some(), "{busy}");

    // Free the chain: the operator kills A; B and then C go through.
    let killed = Request::new("POST", &format!("/api/clients/{a_id}/kill"))
        .token(Some(API_TOKEN))
        .send(running.http)
        .await;
    assert_eq!(killed.status, 200, "{}", killed.body);
    b_update
        .await
        .expect("B's task")
        .expect("B's update went through");
    c.proceeds(WAIT).await;
}

/// A flood of anonymous `GET /api/locks` (a page left open in many tabs, or a script) shares
/// the wait-for graph reads: as many concurrent readers as the endpoint serves at once all get
/// the graph, yet cost at most one read per 250 ms of the flood (plus the first), never one
/// each on the guard's connection.
#[tokio::test]
async fn a_flood_of_lock_graph_readers_shares_a_few_reads() {
    const READERS: usize = lockguard::admin::http::MAX_HTTP_CONNECTIONS;
    lockguard_tests::resources::raise_open_files_limit(4096).expect("open-files limit");
    let db = database("webui_flood").await;
    let mut config = admin_config(&["app.user_sessions"]);
    config.admin.api_token = None;
    let running = start(config, None).await;
    let (_holder, _, holder_id) = blocker(&running, &db).await;
    let before = running.admin.wait_graph_reads();
    let started = Instant::now();
    let answers = futures_util::future::join_all(
        (0..READERS).map(|_| Request::get("/api/locks").send(running.http)),
    )
    .await;
    let elapsed = started.elapsed();
    let reads = running.admin.wait_graph_reads() - before;
    for answer in &answers {
        assert_eq!(answer.status, 200, "{}", answer.body);
        let view = answer.json();
        let holder = view["nodes"]
            .as_array()
            .and_then(|nodes| {
                nodes
                    .iter()
                    .find(|n| n["id"] == format!("client:{holder_id}"))
            })
            .unwrap_or_else(|| panic!("the holder is a node: {view}"));
        // Probed: its protected lock is listed.
        assert_eq!(holder["locks"][0]["table"], "app.user_sessions", "{holder}");
    }
    let allowed = 2 + elapsed.as_millis() as u64 / 250;
    assert!(
        (1..=allowed).contains(&reads),
        "{READERS} readers in {elapsed:?} ran {reads} graph reads (at most {allowed} allowed)"
    );
}
