//! TLS towards PostgreSQL: lockguard speaks TLS to a server started with ssl=on, SCRAM and MD5
//! work across the TLS termination, `upstream_mode` and the certificate checks decide what is
//! accepted, and the guard's own connection follows the same settings (or its dsn's).

use std::sync::Arc;
use std::time::Duration;

use guard_core::{Guard, Registry};
use lockguard_config::{ClientTlsMode, Config, GuardConfig, TlsConfig, Upstream, UpstreamTlsMode};
use lockguard_tests::certs::TestCa;
use lockguard_tests::cluster::{
    TestCluster, GUARD_USER, MD5_PASSWORD, MD5_USER, PG_HBA, SCRAM_PASSWORD, SCRAM_USER,
};
use lockguard_tests::guard_support::{guard_config, guard_role};
use lockguard_tests::proxy::{config_for, http_get, TestProxy};
use lockguard_tests::psql;
use lockguard_tests::query::ask;
use lockguard_tests::tls::{self, connect_tls, Pki, ServerTls};
use tokio_postgres::config::ChannelBinding;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

/// The message of lockguard's FATAL 28000 refusal that ended a login.
fn authorization_refusal(err: &tokio_postgres::Error) -> &str {
    let db_err = err.as_db_error().expect("an ErrorResponse from lockguard");
    assert_eq!(
        db_err.code(),
        &SqlState::INVALID_AUTHORIZATION_SPECIFICATION
    );
    db_err.message()
}

/// A PostgreSQL with ssl=on whose certificate names only `localhost`.
fn tls_cluster(pki: &Pki) -> (TestCluster, tempfile::TempDir) {
    tls_cluster_with_hba(pki, PG_HBA)
}

/// [`tls_cluster`] with its own `pg_hba.conf`, trusting client certificates `pki.ca` signed.
fn tls_cluster_with_hba(pki: &Pki, hba: &str) -> (TestCluster, tempfile::TempDir) {
    ServerTls::signed_by(pki)
        .trusting_clients_of(pki)
        .start(&[], hba)
}

/// The guard role may log in only over TLS and only with a client certificate naming it
/// (`cert`: TLS with a verified certificate is the whole login); everyone else as usual.
fn guard_hostssl_only_hba() -> String {
    format!(
        "local all all trust\n\
         hostssl all {GUARD_USER} 127.0.0.1/32 cert\n\
         host all {GUARD_USER} 127.0.0.1/32 reject\n\
         host all {GUARD_USER} ::1/128 reject\n\
         {PG_HBA}"
    )
}

/// A guard built the way the proxy builds it: TLS from the dsn's `sslmode`, else from `tls`.
fn guard_with(guard: &GuardConfig, tls: &TlsConfig) -> Arc<Guard> {
    let guard_tls = lockguard::tls::guard_tls(guard, tls).expect("the guard's TLS settings");
    Guard::with_tls(guard, guard_tls, Arc::new(Registry::new())).expect("the guard")
}

/// Connects the guard to its own database; the server's view of that connection: whether it
/// is TLS, or the guard's error.
async fn guard_connection_ssl(guard: &Guard, admin: &Client) -> Result<bool, String> {
    guard.check_connection().await.map_err(|e| e.to_string())?;
    let pid = guard
        .health()
        .databases
        .iter()
        .find_map(|d| d.backend_pid)
        .expect("the guard's backend pid");
    Ok(admin
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = $1", &[&pid])
        .await
        .expect("pg_stat_ssl")
        .get(0))
}

/// The guard's connection carries the kills and every SCRAM user's stored secret: it follows
/// `[tls]` (mode, CA, client certificate) like the proxy's own upstream connections, so a guard
/// role PostgreSQL admits only over TLS with a certificate works, and SCRAM logins that need
/// the secret work through it.
#[tokio::test]
async fn the_guards_connection_follows_upstream_tls_and_a_hostssl_only_guard_role_works() {
    let pki = Pki::new("lockguard test CA");
    let (cluster, _server_dir) = tls_cluster_with_hba(&pki, &guard_hostssl_only_hba());
    let guard_cert = pki.ca.issue(pki.dir.path(), GUARD_USER, &[]);
    let admin = cluster.connect_admin().await;
    let mut config = pki.client_tls(config_for(&cluster), ClientTlsMode::Allow);
    config.proxy.upstream = Upstream::Tcp {
        host: "localhost".to_owned(),
        port: cluster.port(),
    };
    config.tls.upstream_mode = UpstreamTlsMode::VerifyFull;
    config.tls.upstream_ca = Some(pki.ca_file.clone());
    config.tls.upstream_cert = Some(guard_cert.cert.clone());
    config.tls.upstream_key = Some(guard_cert.key.clone());
    config.guard = guard_config(&cluster, &[]);
    config.guard.dsn = Some(format!(
        "host=localhost port={} user={GUARD_USER} dbname=postgres",
        cluster.port()
    ));

    let guard = guard_with(&config.guard, &config.tls);
    assert_eq!(guard_connection_ssl(&guard, &admin).await, Ok(true));
    let version: Option<String> = admin
        .query_one(
            "SELECT s.version FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.usename = $1",
            &[&GUARD_USER],
        )
        .await
        .expect("the guard's TLS version")
        .get(0);
    assert!(version.is_some_and(|v| v.starts_with("TLS")));

    // Through a running lockguard: ready, and a SCRAM login that needs the stored secret.
    let proxy = TestProxy::start_with(config.clone()).await;
    let (status, body) = http_get(proxy.http.expect("HTTP endpoint"), "/readyz").await;
    assert_eq!(status, 200, "{body}");
    let client = tls::connect(
        proxy.addr,
        &pki.ca_file,
        (SCRAM_USER, Some(SCRAM_PASSWORD)),
        "postgres",
        ChannelBinding::Prefer,
    )
    .await
    .expect("SCRAM over TLS, with the secret read over the guard's TLS connection");
    assert_eq!(ask(&client, "SELECT current_user::text").await, SCRAM_USER);

    // The same guard in plaintext is what pg_hba.conf refuses.
    let mut plaintext = config.tls.clone();
    plaintext.upstream_mode = UpstreamTlsMode::Disable;
    let refused = guard_connection_ssl(&guard_with(&config.guard, &plaintext), &admin).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("pg_hba.conf rejects") && e.contains("no encryption")),
        "{refused:?}"
    );
}

/// A dsn that says anything about TLS decides the guard's TLS alone, as it would for libpq:
/// `sslmode` (with `verify-ca` / `verify-full`, which tokio-postgres itself does not know),
/// `sslrootcert`, `sslcert`, `sslkey`.
#[tokio::test]
async fn the_dsn_sslmode_decides_the_guards_tls_over_the_tls_section() {
    let pki = Pki::new("lockguard test CA");
    let (cluster, _server_dir) = tls_cluster_with_hba(&pki, &guard_hostssl_only_hba());
    let guard_cert = pki.ca.issue(pki.dir.path(), GUARD_USER, &[]);
    let other_ca = TestCa::new("somebody else's CA").write_ca(pki.dir.path(), "other-ca.crt");
    let admin = cluster.connect_admin().await;
    let client_cert = format!(
        "sslcert={} sslkey={}",
        guard_cert.cert.display(),
        guard_cert.key.display()
    );
    let dsn = |host: &str, tls: &str| GuardConfig {
        dsn: Some(format!(
            "host={host} port={} user={GUARD_USER} dbname=postgres {tls}",
            cluster.port()
        )),
        ..guard_config(&cluster, &[])
    };
    let plaintext_section = TlsConfig::default();
    let mut verifying_section = TlsConfig {
        upstream_mode: UpstreamTlsMode::VerifyFull,
        upstream_ca: Some(pki.ca_file.clone()),
        ..TlsConfig::default()
    };
    verifying_section.upstream_cert = Some(guard_cert.cert.clone());
    verifying_section.upstream_key = Some(guard_cert.key.clone());

    let cases = [
        // require: encrypted though [tls] says plaintext.
        (
            dsn("127.0.0.1", &format!("sslmode=require {client_cert}")),
            &plaintext_section,
            Ok(true),
        ),
        // verify-full against the right CA and name.
        (
            dsn(
                "localhost",
                &format!(
                    "sslmode=verify-full sslrootcert={} {client_cert}",
                    pki.ca_file.display()
                ),
            ),
            &plaintext_section,
            Ok(true),
        ),
        // disable: plaintext though [tls] verifies — and so refused by pg_hba.conf.
        (
            dsn("localhost", "sslmode=disable"),
            &verifying_section,
            Err("pg_hba.conf rejects"),
        ),
        // verify-full against a name the certificate does not carry.
        (
            dsn(
                "127.0.0.1",
                &format!(
                    "sslmode=verify-full sslrootcert={} {client_cert}",
                    pki.ca_file.display()
                ),
            ),
            &plaintext_section,
            Err("certificate"),
        ),
        // require with a root certificate checks the chain (libpq's verify-ca): wrong CA.
        (
            dsn(
                "localhost",
                &format!(
                    "sslmode=require sslrootcert={} {client_cert}",
                    other_ca.display()
                ),
            ),
            &plaintext_section,
            Err("UnknownIssuer"),
        ),
    ];
    for (guard, section, expected) in cases {
        let seen = guard_connection_ssl(&guard_with(&guard, section), &admin).await;
        match expected {
            Ok(ssl) => assert_eq!(seen, Ok(ssl), "{:?}", guard.dsn),
            Err(needle) => assert!(
                seen.as_ref().is_err_and(|e| e.contains(needle)),
                "{:?}: {seen:?}",
                guard.dsn
            ),
        }
    }

    // A dsn asking for TLS without the proxy's TLS configuration is refused, not downgraded.
    let err = Guard::new(
        &dsn("localhost", "sslmode=require"),
        Arc::new(Registry::new()),
    )
    .expect_err("sslmode=require without TLS");
    assert!(err.to_string().contains("TLS"), "{err}");
}

/// A guard that cannot verify the server's certificate does not connect, says why in plain
/// words, and `/readyz` names the reason.
#[tokio::test]
async fn verify_full_against_a_wrong_ca_fails_clearly_and_readyz_says_why() {
    let pki = Pki::new("lockguard test CA");
    let (cluster, _server_dir) = tls_cluster(&pki);
    let other_ca = TestCa::new("somebody else's CA").write_ca(pki.dir.path(), "other-ca.crt");
    let mut config = config_for(&cluster);
    config.tls.upstream_mode = UpstreamTlsMode::VerifyFull;
    config.tls.upstream_ca = Some(other_ca.clone());
    config.guard = guard_config(&cluster, &[]);
    config.guard.dsn = Some(format!(
        "host=localhost port={} user={} dbname=postgres",
        cluster.port(),
        guard_role(&cluster)
    ));
    let proxy = TestProxy::start_with(config).await;
    let (status, body) = http_get(proxy.http.expect("HTTP endpoint"), "/readyz").await;
    assert_eq!(status, 503, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let reason = ready["reason"].as_str().expect("a reason");
    assert!(
        reason.starts_with("guard connection")
            && reason.contains("invalid peer certificate")
            && reason.contains("UnknownIssuer")
            && reason.contains("verify-full")
            && reason.contains(&other_ca.display().to_string()),
        "{reason}"
    );
}

#[tokio::test]
async fn passwords_work_through_client_and_upstream_tls_and_names_are_verified() {
    let pki = Pki::new("lockguard test CA");
    let (cluster, _server_dir) = tls_cluster(&pki);
    if !cluster.is_owned() {
        eprintln!("skipped: needs an owned cluster");
        return;
    }
    let setup = UpstreamTls {
        pki: &pki,
        cluster: &cluster,
    };
    logins_work_over_tls_both_ways(&setup).await;
    binding_capable_clients_need_the_guard(&setup).await;
    failed_secret_lookups_tell_the_client_nothing(&setup).await;
    the_server_certificate_is_verified(&setup).await;
}

/// lockguard with TLS both ways in front of an ssl=on cluster.
struct UpstreamTls<'a> {
    pki: &'a Pki,
    cluster: &'a TestCluster,
}

impl UpstreamTls<'_> {
    /// The configuration: upstream `host` in `mode`, trusting the test CA.
    fn config(&self, host: &str, mode: UpstreamTlsMode) -> Config {
        let (pki, cluster) = (self.pki, self.cluster);
        let mut config = pki.client_tls(config_for(cluster), ClientTlsMode::Allow);
        config.proxy.upstream = Upstream::Tcp {
            host: host.to_owned(),
            port: cluster.port(),
        };
        config.tls.upstream_mode = mode;
        config.tls.upstream_ca = Some(pki.ca_file.clone());
        // SCRAM clients that announce channel binding need lockguard to check their proof
        // with the stored secret, which the guard reads: as the non-superuser role the setup
        // SQL creates, over TLS checked like the proxy's own (so to the same host name).
        config.guard = guard_config(cluster, &[]);
        config.guard.dsn = Some(format!(
            "host={host} port={} user={} dbname=postgres",
            cluster.port(),
            guard_role(cluster)
        ));
        config
    }

    /// lockguard (see [`UpstreamTls::config`]) whose guard looks secrets up with `auth_query`.
    async fn with_auth_query(&self, auth_query: &str) -> TestProxy {
        let mut config = self.config("localhost", UpstreamTlsMode::VerifyFull);
        config.guard.auth_query = auth_query.to_owned();
        TestProxy::start_with(config).await
    }

    /// A SCRAM login through `proxy` with channel binding `binding`.
    async fn scram_login(
        &self,
        proxy: &TestProxy,
        binding: ChannelBinding,
    ) -> Result<Client, tokio_postgres::Error> {
        let login = (SCRAM_USER, Some(SCRAM_PASSWORD));
        tls::connect(proxy.addr, &self.pki.ca_file, login, "postgres", binding).await
    }
}

/// SCRAM and MD5 logins over TLS both ways (verify-full against the certificate's name);
/// wrong passwords get PostgreSQL's 28P01; a client insisting on channel binding is refused.
async fn logins_work_over_tls_both_ways(setup: &UpstreamTls<'_>) {
    let db = "postgres";
    // verify-full against the name in the certificate.
    let proxy = TestProxy::start_with(setup.config("localhost", UpstreamTlsMode::VerifyFull)).await;
    for (user, password) in [(SCRAM_USER, SCRAM_PASSWORD), (MD5_USER, MD5_PASSWORD)] {
        let client = connect_tls(&proxy, &setup.pki.ca_file, user, Some(password), db)
            .await
            .unwrap_or_else(|e| panic!("{user} over TLS both ways: {e:?}"));
        assert_eq!(ask(&client, "SELECT current_user::text").await, user);
        let upstream_ssl: bool = tls::upstream_is_tls(&client).await;
        assert!(upstream_ssl, "the proxy's upstream connection is not TLS");

        let err = connect_tls(&proxy, &setup.pki.ca_file, user, Some("wrong"), db)
            .await
            .expect_err("wrong password refused");
        assert_eq!(
            err.code(),
            Some(&SqlState::INVALID_PASSWORD),
            "{user}: {err:?}"
        );
    }
    {
        // psql with its defaults (channel_binding=prefer) over TLS both ways.
        let conninfo = format!(
            "host=127.0.0.1 port={} user={SCRAM_USER} password={SCRAM_PASSWORD} dbname={db} \
             sslmode=require",
            proxy.addr.port()
        );
        if let Some(out) = psql::run(&[conninfo.as_str(), "-A", "-t", "-c", "SELECT 6 * 7"]).await {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "psql: {stderr}");
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
        }
        // A client that insists on channel binding gets a clear refusal: the binding cannot
        // cross a TLS-terminating proxy, and lockguard does not offer it.
        let conninfo = format!(
            "host=127.0.0.1 port={} user={SCRAM_USER} password={SCRAM_PASSWORD} dbname={db} \
             sslmode=require channel_binding=require",
            proxy.addr.port()
        );
        if let Some(out) = psql::run(&[conninfo.as_str(), "-c", "SELECT 1"]).await {
            assert!(!out.status.success());
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("channel binding"), "{stderr}");
        }
        // The same with tokio-postgres: no SCRAM-SHA-256-PLUS is offered, so the client
        // refuses before sending a proof.
        let err = setup
            .scram_login(&proxy, ChannelBinding::Require)
            .await
            .expect_err("a client requiring channel binding");
        assert_eq!(err.to_string(), "authentication error", "{err:?}");
        let cause = std::error::Error::source(&err).map(ToString::to_string);
        assert_eq!(
            cause.as_deref(),
            Some("server did not use channel binding"),
            "{err:?}"
        );
    }
}

/// Without a guard, a binding-capable SCRAM client is refused saying what to do.
async fn binding_capable_clients_need_the_guard(setup: &UpstreamTls<'_>) {
    // Without a guard there is no stored secret to check a binding-capable SCRAM client with:
    // it gets a clear refusal saying what to do, and a client not offering binding still works.
    let mut no_guard = setup.config("localhost", UpstreamTlsMode::VerifyFull);
    no_guard.guard = Default::default();
    let proxy = TestProxy::start_with(no_guard).await;
    let err = setup
        .scram_login(&proxy, ChannelBinding::Prefer)
        .await
        .expect_err("binding-capable client without a guard");
    let message = authorization_refusal(&err);
    assert!(message.contains("channel_binding=disable"), "{message}");
    let client = setup
        .scram_login(&proxy, ChannelBinding::Disable)
        .await
        .expect("SCRAM without binding is relayed");
    assert_eq!(ask(&client, "SELECT current_user::text").await, SCRAM_USER);
}

/// A missing secret looks like a wrong password; a failing auth_query says nothing of why.
async fn failed_secret_lookups_tell_the_client_nothing(setup: &UpstreamTls<'_>) {
    // A role without a SCRAM secret gets the same answer as a wrong password (mock
    // authentication), and a failing auth_query tells the client nothing about why.
    let proxy = setup
        .with_auth_query("SELECT lockguard.scram_verifier($1::pg_catalog.text) WHERE false")
        .await;
    let err = setup
        .scram_login(&proxy, ChannelBinding::Prefer)
        .await
        .expect_err("no stored secret");
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err:?}");
    drop(proxy);
    let proxy = setup
        .with_auth_query("SELECT no_such_column FROM pg_catalog.pg_authid")
        .await;
    let err = setup
        .scram_login(&proxy, ChannelBinding::Prefer)
        .await
        .expect_err("auth_query fails");
    let message = authorization_refusal(&err);
    assert!(
        !message.contains("no_such_column") && !message.contains("pg_authid"),
        "{message}"
    );
    drop(proxy);
}

/// verify-full checks the name, verify-ca only the chain.
async fn the_server_certificate_is_verified(setup: &UpstreamTls<'_>) {
    // verify-full against an address the certificate does not name: a clear error.
    let proxy = TestProxy::start_with(setup.config("127.0.0.1", UpstreamTlsMode::VerifyFull)).await;
    let err = setup
        .scram_login(&proxy, ChannelBinding::Prefer)
        .await
        .expect_err("wrong upstream name refused");
    let db_err = err.as_db_error().expect("an ErrorResponse from lockguard");
    assert_eq!(db_err.code(), &SqlState::CONNECTION_FAILURE);
    assert!(
        db_err.message().contains("TLS handshake failed")
            && db_err.message().contains("certificate"),
        "{}",
        db_err.message()
    );
    drop(proxy);

    // verify-ca checks the chain, not the name.
    let proxy = TestProxy::start_with(setup.config("127.0.0.1", UpstreamTlsMode::VerifyCa)).await;
    let client = setup
        .scram_login(&proxy, ChannelBinding::Prefer)
        .await
        .expect("verify-ca ignores the name");
    assert_eq!(ask(&client, "SELECT 'ca ok'::text").await, "ca ok");
}

/// `upstream_mode` decides whether lockguard's own connection to PostgreSQL is TLS, as the
/// server's `pg_stat_ssl` sees it: `prefer` and `require` use TLS with an ssl=on server,
/// `disable` does not, and `prefer` falls back to plaintext when the server has no TLS.
#[tokio::test]
async fn upstream_modes_decide_whether_the_server_connection_is_tls() {
    let pki = Pki::new("lockguard test CA");
    let (tls_cluster, _server_dir) = tls_cluster(&pki);
    let plain_cluster = TestCluster::shared();
    if !tls_cluster.is_owned() || !plain_cluster.is_owned() {
        eprintln!("skipped: needs owned clusters (ssl=on and ssl=off)");
        return;
    }
    let cases = [
        (&tls_cluster, UpstreamTlsMode::Prefer, true),
        (&tls_cluster, UpstreamTlsMode::Require, true),
        (&tls_cluster, UpstreamTlsMode::Disable, false),
        (plain_cluster, UpstreamTlsMode::Prefer, false),
    ];
    for (cluster, mode, expect_tls) in cases {
        let mut config = config_for(cluster);
        config.tls.upstream_mode = mode;
        let proxy = TestProxy::start_with(config).await;
        let (client, connection) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(proxy.addr.port())
            .user(cluster.superuser())
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(10))
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: {e:?}"));
        tokio::spawn(connection);
        let upstream_ssl: bool = tls::upstream_is_tls(&client).await;
        assert_eq!(
            upstream_ssl,
            expect_tls,
            "{mode:?} against ssl={}",
            if std::ptr::eq(cluster, &tls_cluster) {
                "on"
            } else {
                "off"
            }
        );
    }
}
